//! A `--features torch` binary records where it was built against libtorch (its `lib` folder,
//! and the CUDA runtime folder `scripts/setup-torch` installs beside it) as its run path, so it
//! runs without LD_LIBRARY_PATH on the machine that built it. LD_LIBRARY_PATH is searched first,
//! so another PyTorch 2.11 (a GPU machine's) still takes over where it is set. The launcher
//! (`src/launcher.rs`) is given the same folders, to look for libtorch where the loader will.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let root = Path::new(&libtorch);
    let mut run_path = Vec::new();
    for dir in [root.join("lib"), root.join("../nvidia/cu13/lib")] {
        if dir.is_dir() {
            let dir = dir.canonicalize().unwrap_or(dir);
            println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", dir.display());
            run_path.push(dir);
        }
    }
    if let Ok(joined) = std::env::join_paths(&run_path) {
        println!(
            "cargo:rustc-env=SOMATRAIN_LIBTORCH_RUN_PATH={}",
            joined.to_string_lossy()
        );
    }
}
