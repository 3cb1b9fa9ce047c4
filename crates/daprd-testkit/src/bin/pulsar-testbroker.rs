//! The Pulsar test broker (`daprd_testkit::pulsar`) as a process, for the SDK end-to-end
//! tests of `pubsub.pulsar`.
//!
//! `pulsar-testbroker [--port P] [--advertised-port A]` listens on 127.0.0.1:P (default: a
//! free port) and sends clients' lookups to 127.0.0.1:A (default: P; a proxy in front of it),
//! prints one line, `pulsar://127.0.0.1:<port>`, then reads commands, one per line, until its input
//! closes or it gets SIGTERM: `drop_connections` ends every client connection (what was sent
//! stays).

use daprd_testkit::pulsar::TestBroker;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = daprd_testkit::flag::<u16>("--port")?.unwrap_or(0);
    let advertised =
        daprd_testkit::flag::<u16>("--advertised-port")?.map(|a| format!("pulsar://127.0.0.1:{a}"));
    let broker = TestBroker::start_advertised(port, advertised).await?;
    println!("{}", broker.url());
    daprd_testkit::broker_commands("pulsar-testbroker", || broker.drop_connections()).await?;
    Ok(())
}
