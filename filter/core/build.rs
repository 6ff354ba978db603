// cargo-fuzz builds with `--cfg fuzzing`; declare it so check-cfg knows the name.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
