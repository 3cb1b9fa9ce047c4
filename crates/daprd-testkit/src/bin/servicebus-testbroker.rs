//! The Azure Service Bus test broker (`daprd_testkit::servicebus`) as a process, for the SDK
//! end-to-end tests of `pubsub.azure.servicebus.topics` and `.queues`.
//!
//! `servicebus-testbroker [--port P] [--max-delivery-count N] [--lock-duration-ms D]` listens
//! on 127.0.0.1:P (default: a free port; deliveries before a message is dead-lettered: 10, as
//! Service Bus's default; locks: 60 s), prints
//! one line, the connection string of its namespace, then reads commands, one per line, until
//! its input closes or it gets SIGTERM: `drop_connections` cuts every client connection (what
//! was sent stays).

use daprd_testkit::servicebus::TestBroker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = daprd_testkit::flag("--port")?.unwrap_or(0);
    let broker = TestBroker::start(port).await?;
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
