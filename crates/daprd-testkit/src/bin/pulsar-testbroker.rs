//! The Pulsar test broker (`daprd_testkit::pulsar`) as a process, for the SDK end-to-end
//! tests of `pubsub.pulsar`.
//!
//! `pulsar-testbroker [--port P] [--advertised-port A]` listens on 127.0.0.1:P (default: a
//! free port) and sends clients' lookups to 127.0.0.1:A (default: P; a proxy in front of it),
//! prints one line, `pulsar://127.0.0.1:<port>`, then reads commands, one per line, until its input
//! closes or it gets SIGTERM: `drop_connections` ends every client connection (what was sent
//! stays).

use std::io::BufRead;

use daprd_testkit::pulsar::TestBroker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| -> Result<Option<u16>, Box<dyn std::error::Error>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .ok_or_else(|| format!("{name} needs a value"))?
                    .parse()?,
            )),
            None => Ok(None),
        }
    };
    let port = value("--port")?.unwrap_or(0);
    let advertised = value("--advertised-port")?.map(|a| format!("pulsar://127.0.0.1:{a}"));
    let broker = TestBroker::start_advertised(port, advertised).await?;
    println!("{}", broker.url());
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = lines.recv() => match line.as_deref().map(str::trim) {
                None => break,
                Some("drop_connections") => broker.drop_connections(),
                Some("") => {}
                Some(other) => eprintln!("pulsar-testbroker: unknown command {other:?}"),
            },
            _ = term.recv() => break,
        }
    }
    Ok(())
}
