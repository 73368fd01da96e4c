//! `somatrain-libtorch`: the whole command line, linked with libtorch (the `torch` feature).
//! Users run `somatrain`, which checks that libtorch can be found and then becomes this binary
//! (same process, same arguments); run directly, it needs libtorch on the run path.

mod cli;
mod commands;
mod progress;

fn main() -> std::process::ExitCode {
    cli::main()
}
