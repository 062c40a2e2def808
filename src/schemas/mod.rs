//! Generated Cap'n Proto code for the bundled schemas (being written).
