//! `somatrain`: the one binary. Built without the `torch` feature it is the whole command line
//! (`src/cli.rs`). Built with it, the command line linked with libtorch is `somatrain-libtorch`,
//! and this binary is its launcher (`src/launcher.rs`): it finds libtorch first, so that a
//! machine without it gets a sentence naming the library and the variable to set instead of the
//! dynamic loader's error.

#[cfg(not(feature = "torch"))]
mod cli;
#[cfg(not(feature = "torch"))]
mod commands;
#[cfg(feature = "torch")]
mod launcher;
#[cfg(not(feature = "torch"))]
mod progress;

fn main() -> std::process::ExitCode {
    #[cfg(not(feature = "torch"))]
    {
        cli::main()
    }
    #[cfg(feature = "torch")]
    {
        launcher::main()
    }
}
