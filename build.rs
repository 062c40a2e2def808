//! Build script. Schemas arrive with the structured-message layer; until then it only tells cargo
//! when to re-run.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=schemas");
}
