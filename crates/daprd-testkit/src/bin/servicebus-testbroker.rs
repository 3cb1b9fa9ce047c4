//! The Azure Service Bus test broker (`daprd_testkit::servicebus`) as a process, for the SDK
//! end-to-end tests of `pubsub.azure.servicebus.topics` and `.queues`.
//!
//! `servicebus-testbroker [--port P] [--max-delivery-count N] [--lock-duration-ms D]
//! [--data-dir DIR]` listens on 127.0.0.1:P (default: a free port; deliveries before a message
//! is dead-lettered: 10, as Service Bus's default; locks: 60 s; with `--data-dir`, its entities
//! and messages are kept in DIR, rewritten before each change is answered, and a broker started
//! again on it goes on from there), prints
//! one line, the connection string of its namespace, then reads commands, one per line, until
//! its input closes or it gets SIGTERM: `drop_connections` cuts every client connection (what
//! was sent stays).

use daprd_testkit::servicebus::TestBroker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = daprd_testkit::flag("--port")?.unwrap_or(0);
    let broker = match daprd_testkit::flag::<std::path::PathBuf>("--data-dir")? {
        Some(dir) => TestBroker::start_persistent(port, &dir).await?,
        None => TestBroker::start(port).await?,
    };
    broker.configure(
        std::time::Duration::from_millis(
            daprd_testkit::flag("--lock-duration-ms")?.unwrap_or(60_000),
        ),
        daprd_testkit::flag("--max-delivery-count")?.unwrap_or(10),
    );
    println!("{}", broker.connection_string());
    daprd_testkit::broker_commands("servicebus-testbroker", || broker.drop_connections()).await?;
    Ok(())
}
