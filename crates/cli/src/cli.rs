//! The command line: parses flags, sets up logging and hands off to a command in
//! [`crate::commands`]. Libraries never print; this crate does.

use std::process::ExitCode;

use crate::{commands, progress};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "somatrain",
    version,
    about = "Train, score and publish SOMA V1 model weights"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score weights on data exactly as the network does; lowest loss wins.
    Score(commands::score::ScoreArgs),
    /// Train weights on a local corpus, resumably; leaves the round's artifacts in the run dir.
    Train(Box<commands::train::TrainArgs>),
    /// Held-out loss and bits per byte of weights on data.
    Eval(commands::train::EvalArgs),
    /// The embedding of weights over data (the network's definition), as JSON.
    Embed(commands::train::EmbedArgs),
    /// Encrypt a file as the network publishes weights (AES-256-CTR, zero IV).
    Encrypt(commands::crypto::EncryptArgs),
    /// Decrypt a file encrypted with `encrypt` (or by the official SDK).
    Decrypt(commands::crypto::DecryptArgs),
    /// Blake2b-256 commitment (Base58) of a file, or of an embedding.
    Commitment(commands::crypto::CommitmentArgs),
    /// Run a local SOMA-rules network over the network's own gRPC protocol until interrupted.
    Localnet(commands::localnet::LocalnetArgs),
    /// Show the chain's epoch, models and open targets, the wallet and a run's loop.
    Status(commands::net::StatusArgs),
    /// Publish a round: create the model if needed, encrypt and upload the weights, commit.
    Commit(commands::publish::CommitArgs),
    /// Reveal the committed round (key and embedding) in the epoch after its commit.
    Reveal(commands::publish::RevealArgs),
    /// The unattended loop: train a round, commit, reveal at the epoch change, repeat.
    Run(Box<commands::publish::RunArgs>),
    /// Start an embedded localnet, fund a wallet, train, commit, advance, reveal: all in one.
    LocalnetCycle(commands::publish::CycleArgs),
    /// List targets with their assigned models, threshold and reward.
    Targets(commands::submit::TargetsArgs),
    /// Score data against a target's models and submit it if it lands within the threshold.
    Submit(Box<commands::submit::SubmitArgs>),
    /// What an embedding is worth under the chain's assignment rule: its share of new targets,
    /// targets and rewards per epoch, rivals, and a search for a better position.
    Strategy(commands::strategy::StrategyArgs),
    /// A target's submitted data: download.
    #[command(subcommand)]
    Target(commands::submit::TargetCommand),
    /// The data submitter as a service: score corpus pieces against every open target for
    /// days, submit hits in the background, claim as soon as allowed; journaled, resumable.
    Submitter(Box<commands::submitter::SubmitterArgs>),
    /// Claim every claimable reward of the wallet.
    Claim(commands::submit::ClaimArgs),
    /// Manage a model after it was created: show, stake, unstake, commission, deactivate.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Stake SOMA with a validator (or a model): it earns from the next epoch.
    Stake(commands::stake::StakeArgs),
    /// Withdraw a StakedSoma: its principal and the rewards it earned.
    Unstake(commands::stake::UnstakeArgs),
    /// The validators: voting power, commission, stake and yield.
    Validators(commands::stake::ValidatorsArgs),
    /// Send SOMA to another account.
    #[command(alias = "send")]
    Transfer(commands::model::TransferArgs),
    /// Pay several accounts in one transaction (`--to A,B --amount 1,2.5`).
    Pay(commands::account::PayArgs),
    /// The wallet's (or any address's) balance, and with --with-coins every coin.
    Balance(commands::account::BalanceArgs),
    /// Merge the wallet's coins into one (the smallest sent to itself, the rest as gas).
    MergeCoins(commands::account::MergeCoinsArgs),
    /// Objects an account owns (coins, staked SOMA), with versions and digests.
    Objects(commands::account::ObjectsArgs),
    /// One transaction: kind, status (with the network's error kind), fee, balance changes.
    Tx(commands::account::TxArgs),
    /// The account key: new, import, show.
    #[command(subcommand)]
    Wallet(commands::wallet::WalletCommand),
    /// Charts of a run: loss and held-out rounds, learning rate, throughput (SVG or PNG).
    Plot(commands::plot::PlotArgs),
    /// Shell completions for somatrain, printed to standard output (e.g. `somatrain
    /// completions bash > ~/.local/share/bash-completion/completions/somatrain`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Throughput benchmarks that print one JSON line at the end.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

/// Keeps the process's last warnings and errors for the status page.
struct RecentErrors;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecentErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.0 = value.to_string();
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        // More verbose levels compare greater: this keeps warnings and errors.
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let name = if level == tracing::Level::ERROR {
            "error"
        } else {
            "warning"
        };
        somatrain_daemon::status::recent_errors().push(name, message.0);
    }
}

pub fn main() -> ExitCode {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "somatrain=info".into()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(progress::BarSafeStderr)
                .with_target(false)
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    meta.target() != progress::PROGRESS_TARGET
                })),
        )
        .with(progress::TransferLayer::default())
        .with(RecentErrors)
        .init();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Score(args) => {
            let sub = matches.subcommand_matches("score").expect("score matched");
            commands::score::run(args, sub)
        }
        Command::Train(args) => commands::train::run_train(*args),
        Command::Eval(args) => commands::train::run_eval(args),
        Command::Embed(args) => commands::train::run_embed(args),
        Command::Encrypt(args) => commands::crypto::run_encrypt(args),
        Command::Decrypt(args) => commands::crypto::run_decrypt(args),
        Command::Commitment(args) => commands::crypto::run_commitment(args),
        Command::Localnet(args) => commands::localnet::run_localnet(args),
        Command::Status(args) => commands::net::run_status(args),
        Command::Commit(args) => commands::publish::run_commit(args),
        Command::Reveal(args) => commands::publish::run_reveal(args),
        Command::Run(args) => commands::publish::run_loop(*args),
        Command::LocalnetCycle(args) => commands::publish::run_cycle(args),
        Command::Targets(args) => commands::submit::run_targets(args),
        Command::Strategy(args) => commands::strategy::run_strategy(args),
        Command::Pay(args) => commands::account::run_pay(args),
        Command::Balance(args) => commands::account::run_balance(args),
        Command::MergeCoins(args) => commands::account::run_merge_coins(args),
        Command::Objects(args) => commands::account::run_objects(args),
        Command::Tx(args) => commands::account::run_tx(args),
        Command::Target(command) => commands::submit::run_target(command),
        Command::Submitter(args) => commands::submitter::run_submitter(*args),
        Command::Submit(args) => commands::submit::run_submit(*args),
        Command::Claim(args) => commands::submit::run_claim(args),
        Command::Model(cmd) => commands::model::run_model(cmd),
        Command::Transfer(args) => commands::model::run_transfer(args),
        Command::Stake(args) => commands::stake::run_stake(args),
        Command::Unstake(args) => commands::stake::run_unstake(args),
        Command::Validators(args) => commands::stake::run_validators(args),
        Command::Wallet(cmd) => commands::wallet::run(cmd),
        Command::Plot(args) => commands::plot::run_plot(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "somatrain",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Bench(cmd) => commands::bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            let mut said = err.to_string();
            for cause in err.chain().skip(1) {
                // Many errors end with their cause's words already ("{path}: {source}").
                let text = cause.to_string();
                if !said.ends_with(&text) {
                    eprintln!("  caused by: {text}");
                }
                said = text;
            }
            ExitCode::FAILURE
        }
    }
}
