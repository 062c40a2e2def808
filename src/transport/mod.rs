//! Unix-socket transport: the unstructured channel (being written).
