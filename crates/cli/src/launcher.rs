//! The `somatrain` of a `torch` build: finds libtorch, then becomes `somatrain-libtorch` (the
//! command line linked with it) in the same process, with the same arguments.
//!
//! A binary linked with libtorch cannot report a missing libtorch itself: the dynamic loader
//! stops it before `main` with a message that names the library but not what to do. This one
//! links neither libtorch nor any somatrain crate, so it always starts, looks for libtorch where
//! the loader will look (and where `LIBTORCH` says), and either names what is missing or
//! `exec`s the real binary. It must stay that small: anything it links, it needs to start.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The command line linked with libtorch, which the build puts beside this binary.
const ENGINE: &str = "somatrain-libtorch";
/// What the engine binary links directly; the rest of libtorch is found through these.
const LIBRARIES: [&str; 2] = ["libtorch_cpu.so", "libc10.so"];
/// tch 0.24 binds this PyTorch release, and libtorch's C++ symbols change from one to the next.
const TORCH_RELEASE: &str = "2.11";
/// Where the build found libtorch (and the CUDA runtime beside it): the binaries' run path.
const BUILT_AGAINST: Option<&str> = option_env!("SOMATRAIN_LIBTORCH_RUN_PATH");
const HOW_TO_SET: &str = "Set LIBTORCH to the torch folder of a PyTorch 2.11 install, for example\n  \
     export LIBTORCH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')\n\
     or, in a somatrain checkout, run: eval \"$(scripts/setup-torch)\"";

pub fn main() -> ExitCode {
    match launch() {
        Ok(mut engine) => {
            let error = engine.exec();
            eprintln!("error: {ENGINE} could not be started: {error}");
        }
        Err(message) => eprintln!("error: {message}"),
    }
    ExitCode::FAILURE
}

fn launch() -> Result<Command, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("this binary cannot find its own path ({e})"))?;
    let engine = exe.with_file_name(ENGINE);
    if !engine.is_file() {
        return Err(format!(
            "this somatrain was built with libtorch (the `torch` feature) and starts {ENGINE}, \
             which is not beside it ({} is missing): copy both binaries from the build's \
             target folder",
            engine.display()
        ));
    }
    let search = LibrarySearch::from_env()?;
    search.check()?;
    let mut args = std::env::args_os();
    let mut command = Command::new(&engine);
    command.arg0(args.next().unwrap_or_else(|| "somatrain".into()));
    command.args(args);
    if let Some(path) = search.engine_library_path()? {
        command.env("LD_LIBRARY_PATH", path);
    }
    Ok(command)
}

/// The folders the dynamic loader will search for the engine's libraries, in its order.
struct LibrarySearch {
    /// `LIBTORCH`'s `lib` and its CUDA libraries, put ahead of `LD_LIBRARY_PATH` for the engine.
    from_libtorch: Vec<PathBuf>,
    library_path: Vec<PathBuf>,
    built_against: Vec<PathBuf>,
}

impl LibrarySearch {
    fn from_env() -> Result<Self, String> {
        let mut from_libtorch = Vec::new();
        if let Some(root) = std::env::var_os("LIBTORCH").filter(|v| !v.is_empty()) {
            let root = PathBuf::from(root);
            let lib = root.join("lib");
            if !lib.join(LIBRARIES[0]).is_file() {
                return Err(format!(
                    "LIBTORCH is {}, which has no lib/{}: LIBTORCH must name the torch folder \
                     of a PyTorch {TORCH_RELEASE} install (the one holding lib/)",
                    root.display(),
                    LIBRARIES[0]
                ));
            }
            from_libtorch.push(lib);
            // A pip install keeps CUDA's libraries (libcudart, cuBLAS, cuDNN, …) in
            // site-packages/nvidia/*/lib, beside torch/.
            if let Ok(entries) = std::fs::read_dir(root.join("../nvidia")) {
                let mut cuda: Vec<PathBuf> = entries
                    .flatten()
                    .map(|entry| entry.path().join("lib"))
                    .filter(|lib| lib.is_dir())
                    .collect();
                cuda.sort();
                from_libtorch.extend(cuda);
            }
        }
        let library_path = std::env::var_os("LD_LIBRARY_PATH")
            .map(|value| std::env::split_paths(&value).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|dir| !dir.as_os_str().is_empty())
            .collect();
        let built_against = BUILT_AGAINST
            .map(|dirs| std::env::split_paths(dirs).collect())
            .unwrap_or_default();
        Ok(Self {
            from_libtorch,
            library_path,
            built_against,
        })
    }

    /// Every library is found, and the libtorch found is the release this build binds.
    fn check(&self) -> Result<(), String> {
        for library in LIBRARIES {
            match self.find(library) {
                Some(dir) => {
                    if library == LIBRARIES[0] {
                        check_release(&dir)?;
                    }
                }
                None => self.ask_the_loader(library)?,
            }
        }
        Ok(())
    }

    fn find(&self, library: &str) -> Option<PathBuf> {
        self.from_libtorch
            .iter()
            .chain(&self.library_path)
            .chain(&self.built_against)
            .find(|dir| dir.join(library).is_file())
            .cloned()
    }

    /// The last places the loader looks (its cache and the system's folders) are its own to
    /// know, so it is asked: a libtorch installed system-wide is found there.
    fn ask_the_loader(&self, library: &str) -> Result<(), String> {
        // SAFETY: loading a library runs its initialisers; libtorch's register its operators
        // and have no other effect on this process, which is replaced by the engine next.
        match unsafe { libloading::Library::new(library) } {
            Ok(_) => Ok(()),
            Err(loader) => {
                let listed = |dirs: &[PathBuf]| -> String {
                    if dirs.is_empty() {
                        "none".to_string()
                    } else {
                        dirs.iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                };
                Err(format!(
                    "this somatrain was built with libtorch (PyTorch {TORCH_RELEASE}), and \
                     {library} is not found: not in LD_LIBRARY_PATH ({}), nor where it was \
                     built ({}), nor by the system's loader ({loader}).\n{HOW_TO_SET}",
                    listed(&self.library_path),
                    listed(&self.built_against),
                ))
            }
        }
    }

    /// `LD_LIBRARY_PATH` for the engine: `LIBTORCH`'s folders first, when it is set.
    fn engine_library_path(&self) -> Result<Option<OsString>, String> {
        if self.from_libtorch.is_empty() {
            return Ok(None);
        }
        std::env::join_paths(self.from_libtorch.iter().chain(&self.library_path))
            .map(Some)
            .map_err(|e| format!("LIBTORCH cannot be put in LD_LIBRARY_PATH ({e})"))
    }
}

/// Refuses a libtorch of another PyTorch release, where the install says which it is (a pip
/// install's `torch/version.py`, a libtorch archive's `build-version`).
fn check_release(lib: &Path) -> Result<(), String> {
    let Some(release) = torch_release(lib) else {
        return Ok(());
    };
    if release.starts_with(&format!("{TORCH_RELEASE}.")) {
        return Ok(());
    }
    Err(format!(
        "{} is PyTorch {release}'s libtorch, and this somatrain was built for PyTorch \
         {TORCH_RELEASE}: their libraries are not interchangeable.\n{HOW_TO_SET}",
        lib.display()
    ))
}

fn torch_release(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text
            .lines()
            .find(|line| line.trim_start().starts_with("__version__"))?;
        let quoted = line.split(['\'', '"']).nth(1)?;
        return Some(quoted.to_string());
    }
    let text = std::fs::read_to_string(root.join("build-version")).ok()?;
    Some(text.trim().to_string()).filter(|v| !v.is_empty())
}
