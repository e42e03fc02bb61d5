//! Embeds `schemas/clickhouse/*.sql` so that `meterflow-admin migrate` works from anywhere,
//! even without the repository next to the binary.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or("cargo sets CARGO_MANIFEST_DIR")?);
    let dir = manifest.join("../../schemas/clickhouse");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_file() && name.ends_with(".sql") {
                println!("cargo:rerun-if-changed={}", path.display());
                files.push((name, path.canonicalize().unwrap_or(path)));
            }
        }
    }
    files.sort();

    let mut out = String::from("/// `(file name, contents)` of every migration, embedded at compile time.\n");
    out.push_str("pub static EMBEDDED: &[(&str, &str)] = &[\n");
    for (name, path) in &files {
        writeln!(out, "    ({name:?}, include_str!({:?})),", path.display().to_string())?;
    }
    out.push_str("];\n");
    writeln!(out, "/// Where the embedded migrations came from.\npub static SOURCE_DIR: &str = {:?};", dir.display().to_string())?;

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    std::fs::write(out_dir.join("embedded_migrations.rs"), out)?;
    Ok(())
}
