//! Compiles `cpp/optimizer.cpp`, the few libtorch operators tch does not bind, against the same
//! libtorch torch-sys found (its `links = "tch"` metadata names libtorch's library folder).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=cpp/optimizer.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys names libtorch's library folder (DEP_TCH_LIBTORCH_LIB)");
    let root = PathBuf::from(lib)
        .parent()
        .expect("libtorch's lib folder has a parent")
        .to_path_buf();
    // PyTorch's wheels and libtorch archives since 2.7 use the C++11 ABI; torch-sys reads the
    // same variable where one does not.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("cpp/optimizer.cpp")
        .compile("somatrain_torch_shim");
}
