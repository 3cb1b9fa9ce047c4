//! `daprd`: parse flags, load and validate resources, build components, serve, drain.
//!
//! `daprd validate [--resources-path DIR...] [--config FILE]` checks resources and the
//! Configuration without binding or connecting.

use std::process::ExitCode;

use clap::Parser;
use daprd_runtime::config::{cli, Env, Options, RuntimeConfig, RUNTIME_VERSION};
use daprd_runtime::kubernetes::{self, KubernetesError};
use daprd_runtime::serve::{self, Sidecar, StartError};

mod logging;

fn print_problems(problems: &[String]) {
    for p in problems {
        eprintln!("error: {p}");
    }
}

/// With `--features mimalloc`: the glibc allocator spends about 9 % of the sidecar's CPU under
/// publish load (malloc, free, consolidation); mimalloc trades that for ~1 MB more idle RSS
/// and about twice the RSS after 1 MB bodies, whose pages it keeps (docs/BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let validate = args.get(1).map(String::as_str) == Some("validate");
    if validate {
        args.remove(1);
    }
    let opts = match Options::try_parse_from(cli::normalise_args(args)) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if cli::flag_bool("version", &opts.version).unwrap_or(false) {
        println!("{RUNTIME_VERSION}");
        return ExitCode::SUCCESS;
    }
    if cli::flag_bool("build-info", &opts.build_info).unwrap_or(false) {
        println!(
            "daprd-rs {}\nDapr API compatibility: {RUNTIME_VERSION}",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let config = match RuntimeConfig::from_options(&opts, Env::from_process(), !validate) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(&problems);
            return ExitCode::FAILURE;
        }
    };
    logging::init(config.log_level, config.log_as_json, &config.app_id);
    for (flag, value) in cli::ignored_flags(&opts) {
        tracing::debug!(flag, value, "flag accepted for compatibility and ignored");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        if validate {
            return run_validate(&config).await;
        }
        run(config).await
    });
    // The shutdown sequence has had its grace period; work still running on the blocking pool
    // is abandoned, as Go daprd's exit does (dropping the runtime would wait for it: a Kafka
    // consumer's close, for one, waits for a group coordinator as long as the broker is gone).
    runtime.shutdown_timeout(EXIT_WAIT);
    code
}

/// How long the exit waits for blocking work left after the shutdown sequence.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

async fn run_validate(config: &RuntimeConfig) -> ExitCode {
    if config.resources_paths.is_empty() && config.config_files.is_empty() {
        eprintln!("error: give at least one --resources-path or --config to validate");
        return ExitCode::FAILURE;
    }
    match serve::load(config, &daprd_components::builtin_registry(), false).await {
        Ok(loaded) => {
            if !config.config_files.is_empty() {
                println!("ok: configuration {:?} valid", loaded.configuration.name);
            }
            println!(
                "ok: {} component(s) and {} subscription(s) valid",
                loaded.store.registered().len(),
                loaded.subscriptions.len()
            );
            ExitCode::SUCCESS
        }
        Err(StartError::Resources(problems)) => {
            print_problems(&problems);
            eprintln!("{} problem(s) found", problems.len());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: RuntimeConfig) -> ExitCode {
    tracing::info!(app_id = %config.app_id, version = RUNTIME_VERSION, "starting daprd-rs");
    let loaded = match &config.kubernetes {
        Some(k8s) => {
            if let Err(e) = kubernetes::check_not_root() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let waiting = serve::public_port_not_ready(&config).await;
            let registry = daprd_components::builtin_registry();
            let loaded = kubernetes::load(&config, k8s, &registry).await;
            if let Some(w) = waiting {
                w.abort();
                let _ = w.await;
            }
            match loaded {
                Ok(l) => Ok(l),
                Err(KubernetesError::Start(e)) => Err(e),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => serve::load(&config, &daprd_components::builtin_registry(), true).await,
    };
    let loaded = match loaded {
        Ok(s) => s,
        Err(StartError::Resources(problems)) => {
            print_problems(&problems);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sidecar = match Sidecar::start(config, loaded).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = sidecar.state.shutdown.clone();
    tokio::spawn(async move {
        serve::termination_signal().await;
        shutdown.trigger(daprd_runtime::state::ShutdownReason::Signal);
    });
    sidecar.run_until_shutdown().await;
    ExitCode::SUCCESS
}
