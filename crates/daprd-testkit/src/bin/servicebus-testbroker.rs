//! The Azure Service Bus test broker (`daprd_testkit::servicebus`) as a process, for the SDK
//! end-to-end tests of `pubsub.azure.servicebus.topics` and `.queues`.
//!
//! `servicebus-testbroker [--port P] [--max-delivery-count N] [--lock-duration-ms D]` listens
//! on 127.0.0.1:P (default: a free port; deliveries before a message is dead-lettered: 10, as
//! Service Bus's default; locks: 60 s), prints
//! one line, the connection string of its namespace, then reads commands, one per line, until
//! its input closes or it gets SIGTERM: `drop_connections` cuts every client connection (what
//! was sent stays).

use std::io::BufRead;

use daprd_testkit::servicebus::TestBroker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| -> Result<Option<u64>, Box<dyn std::error::Error>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .ok_or_else(|| format!("{name} needs a value"))?
                    .parse()?,
            )),
            None => Ok(None),
        }
    };
    let port = u16::try_from(value("--port")?.unwrap_or(0))?;
    let broker = TestBroker::start(port).await?;
    broker.configure(
        std::time::Duration::from_millis(value("--lock-duration-ms")?.unwrap_or(60_000)),
        u32::try_from(value("--max-delivery-count")?.unwrap_or(10))?,
    );
    println!("{}", broker.connection_string());
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
                Some(other) => eprintln!("servicebus-testbroker: unknown command {other:?}"),
            },
            _ = term.recv() => break,
        }
    }
    Ok(())
}
