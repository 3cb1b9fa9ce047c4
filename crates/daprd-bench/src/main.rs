//! `daprd-bench`: measures daprd-rs on loopback and prints tables plus a JSON file.
//!
//! * Publish overhead, side by side in one run, for every broker that is up: A = the broker
//!   written directly (the Redis client itself for Redis; for the others the component in
//!   process: the same client and code without the sidecar hop), B-HTTP = `POST
//!   /v1.0/publish/...` through daprd-rs, B-gRPC = `Dapr/PublishEvent`; bulk publish 10 and 100.
//!   Blocks are interleaved (A, B, A, B...) so machine drift hits every row alike.
//!   Concurrency 1 gives latency percentiles, 16 throughput; sidecar CPU per message per row
//!   from `/proc/<pid>/stat` deltas.
//! * End to end (`e2e.rs`): open-loop rates, closed-loop maximum, a 10 ms handler; idle CPU
//!   and RSS of a sidecar with subscriptions.
//! * Bulk publish memory (`bulk_memory.rs`): RSS of a fresh sidecar around three bulk
//!   publishes of 50,000 entries, in-memory and Redis.
//! * Observability cost (`observability.rs`): publish throughput and sidecar CPU per publish
//!   with metrics off and on, and RSS with metrics on after 100 topics.
//! * Hot reload cost (`reload.rs`): publish latency while the component is rewritten every
//!   second vs without.
//! * Load generators in C (`loadgen.rs`, `--loadgen`): `redis-benchmark`, `wrk` and `h2load`
//!   against the direct path and the sidecar, every row a ratio to the direct one.
//! * CloudEvent envelope (`envelope.rs`, `--envelope`): the tree path and the one-pass path,
//!   in process, for 1 KB and 1 MB bodies.
//! * Large messages (`large.rs`, `--large`): 1 MB and 3 MB publishes through the sidecar
//!   against a direct `XADD` of the same envelope, and the sidecar's RSS around them.
//! * Soak (`soak.rs`, `--soak SECS`): steady publish → deliver, RSS and fds every 10 s.
//! * Footprint: exec → `/v1.0/healthz/outbound` 204, idle RSS, binary size (and stripped).
//!
//! `--quick` runs a few seconds (CI keeps the harness from rotting); the default full mode
//! is what `docs/BENCHMARKS.md` records. `--daprd PATH` picks the binary (default: the
//! release build, else the debug build, next to this executable).

mod bulk_memory;
mod e2e;
mod envelope;
mod large;
mod loadgen;
mod observability;
mod proc;
mod publish;
mod reload;
mod soak;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use daprd_core::pubsub::{PubSub, PubSubFactory};
use serde_json::json;

/// `MAXLEN ~` of the Redis publish rows, direct and through the sidecar alike.
pub const REDIS_MAXLEN: u64 = 10_000;

pub struct Opts {
    quick: bool,
    daprd: PathBuf,
    out: PathBuf,
    redis: String,
    blocks: usize,
    block: Duration,
    /// Only publish rows whose name contains this (profiling runs); skips the e2e part.
    only: Option<String>,
    /// `--soak SECS`: only the soak run, this long.
    soak: Option<u64>,
    /// `--soak-rate N`: messages per second of the soak (default 200).
    soak_rate: u64,
    /// One part run alone (its flag), instead of the full run.
    part: Option<Part>,
}

fn parse_args() -> Result<Opts> {
    let mut quick = false;
    let mut daprd = None;
    let mut out = PathBuf::from("target/bench-results.json");
    let mut redis = std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let mut blocks = None;
    let mut block = None;
    let mut only = None;
    let mut soak = None;
    let mut soak_rate = 200;
    let mut part = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--daprd" => daprd = Some(PathBuf::from(args.next().context("--daprd needs a path")?)),
            "--out" => out = PathBuf::from(args.next().context("--out needs a path")?),
            "--redis" => redis = args.next().context("--redis needs host:port")?,
            "--blocks" => blocks = Some(args.next().context("--blocks needs a number")?.parse()?),
            "--block-secs" => {
                block = Some(Duration::from_secs_f64(
                    args.next().context("--block-secs needs seconds")?.parse()?,
                ))
            }
            "--only" => only = Some(args.next().context("--only needs a row name part")?),
            "--bulk-memory" => part = Some(Part::BulkMemory),
            "--observability" => part = Some(Part::Observability),
            "--reload" => part = Some(Part::Reload),
            "--loadgen" => part = Some(Part::Loadgen),
            "--envelope" => part = Some(Part::Envelope),
            "--large" => part = Some(Part::Large),
            "--e2e" => part = Some(Part::E2e),
            "--soak" => soak = Some(args.next().context("--soak needs seconds")?.parse()?),
            "--soak-rate" => {
                soak_rate = args.next().context("--soak-rate needs a rate")?.parse()?
            }
            "-h" | "--help" => {
                println!("daprd-bench [--quick] [--daprd PATH] [--out FILE] [--redis HOST:PORT] [--blocks N] [--block-secs S] [--only ROW-PART] [--soak SECS [--soak-rate N]] [--bulk-memory] [--observability] [--reload] [--loadgen] [--envelope] [--large] [--e2e]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let daprd = match daprd {
        Some(p) => p,
        None => {
            let me = std::env::current_exe()?;
            let dir = me.parent().context("executable dir")?;
            let release = dir.join("../release/daprd");
            let beside = dir.join("daprd");
            if dir.ends_with("release") && beside.exists() {
                beside
            } else if release.exists() {
                release
            } else {
                beside
            }
        }
    };
    let (default_blocks, default_block) = if quick {
        (1, Duration::from_millis(300))
    } else {
        (5, Duration::from_secs(4))
    };
    Ok(Opts {
        quick,
        daprd,
        out,
        redis,
        blocks: blocks.unwrap_or(default_blocks),
        block: block.unwrap_or(default_block),
        only,
        soak,
        soak_rate,
        part,
    })
}

/// A part of the full run that a flag runs alone; its rows go under its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `--bulk-memory`: the bulk publish memory rows.
    BulkMemory,
    /// `--observability`: the cost rows of metrics.
    Observability,
    /// `--reload`: the hot reload cost rows.
    Reload,
    /// `--loadgen`: the C load-generator rows.
    Loadgen,
    /// `--envelope`: the envelope rows.
    Envelope,
    /// `--large`: the large-message rows.
    Large,
    /// `--e2e`: the end-to-end rows (open loop, closed loop, slow handler) and the idle footprint.
    E2e,
}

/// The brokers the harness knows; rows run for those whose port answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Memory,
    Redis,
    RabbitMq,
    Mqtt,
    JetStream,
    /// Only with the `kafka` feature (the daprd under test needs it too).
    Kafka,
    /// Google's Pub/Sub emulator on 127.0.0.1:8085.
    Gcp,
    /// The repository's Pulsar test broker, started in this process ([`PULSAR_URL`]).
    Pulsar,
}

/// `pulsar://127.0.0.1:<port>` of the Pulsar test broker this process started, if it did.
pub static PULSAR_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn pulsar_url() -> String {
    PULSAR_URL.get().cloned().unwrap_or_default()
}

const NATS: &str = "nats://127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672";
const MQTT: &str = "tcp://127.0.0.1:1883";
const KAFKA: &str = "127.0.0.1:9092";
const PUBSUB_EMULATOR: &str = "127.0.0.1:8085";

impl Broker {
    /// The component name in the sidecar.
    pub fn component(self) -> &'static str {
        match self {
            Broker::Memory => "memory",
            Broker::Redis => "redis",
            Broker::RabbitMq => "rabbitmq",
            Broker::Mqtt => "mqtt",
            Broker::JetStream => "jetstream",
            Broker::Kafka => "kafka",
            Broker::Gcp => "gcp",
            Broker::Pulsar => "pulsar",
        }
    }

    pub fn address(self, redis: &str) -> Option<String> {
        match self {
            Broker::Memory => None,
            Broker::Redis => Some(redis.to_string()),
            Broker::RabbitMq => Some("127.0.0.1:5672".into()),
            Broker::Mqtt => Some("127.0.0.1:1883".into()),
            Broker::JetStream => Some("127.0.0.1:4222".into()),
            Broker::Kafka => Some(KAFKA.into()),
            Broker::Gcp => Some(PUBSUB_EMULATOR.into()),
            Broker::Pulsar => Some(pulsar_url().trim_start_matches("pulsar://").to_string()),
        }
    }

    /// Component metadata (the same in the sidecar and in process).
    fn metadata(self, redis: &str, redis_maxlen: bool) -> Vec<(&'static str, String)> {
        match self {
            Broker::Memory => vec![],
            Broker::Redis => {
                let mut md = vec![("redisHost", redis.to_string())];
                if redis_maxlen {
                    md.push(("maxLenApprox", REDIS_MAXLEN.to_string()));
                }
                md
            }
            Broker::RabbitMq => vec![
                ("connectionString", AMQP.into()),
                ("publisherConfirm", "true".into()),
            ],
            Broker::Mqtt => vec![
                ("url", MQTT.into()),
                ("qos", "1".into()),
                ("consumerID", "{uuid}".into()),
            ],
            Broker::JetStream => vec![("natsURL", NATS.into())],
            // tansu creates no topic on demand
            Broker::Kafka => vec![
                ("brokers", KAFKA.into()),
                ("authType", "none".into()),
                ("autoCreateTopics", "true".into()),
                ("consumerID", "{uuid}".into()),
            ],
            Broker::Gcp => vec![
                ("projectId", "daprd-bench".into()),
                ("endpoint", PUBSUB_EMULATOR.into()),
                ("consumerID", "{uuid}".into()),
            ],
            // batching off: a batch waits batchingMaxPublishDelay (10 ms) for company, which
            // would hide the sidecar's own cost in the rows
            Broker::Pulsar => vec![
                ("host", pulsar_url()),
                ("disableBatching", "true".into()),
                ("consumerID", "{uuid}".into()),
            ],
        }
    }

    fn component_type(self) -> &'static str {
        match self {
            Broker::Memory => "pubsub.in-memory",
            Broker::Redis => "pubsub.redis",
            Broker::RabbitMq => "pubsub.rabbitmq",
            Broker::Mqtt => "pubsub.mqtt3",
            Broker::JetStream => "pubsub.jetstream",
            Broker::Kafka => "pubsub.kafka",
            Broker::Gcp => "pubsub.gcp.pubsub",
            Broker::Pulsar => "pubsub.pulsar",
        }
    }

    /// The component in this process (the A row's "direct" client for non-Redis brokers).
    pub async fn connect_in_process(self) -> Result<Option<Arc<dyn PubSub>>> {
        let md: daprd_core::Metadata = self
            .metadata("", false)
            .into_iter()
            .map(|(k, v)| {
                let v = if v == "{uuid}" {
                    format!("bench-{}", std::process::id())
                } else {
                    v
                };
                (k.to_string(), v)
            })
            .chain([(
                "consumerID".to_string(),
                format!("bench-direct-{}", std::process::id()),
            )])
            .collect();
        let c: Arc<dyn PubSub> = match self {
            Broker::Memory | Broker::Redis => return Ok(None),
            Broker::RabbitMq => {
                daprd_components::rabbitmq::RabbitFactory
                    .connect("bench", &md)
                    .await?
            }
            Broker::Mqtt => {
                daprd_components::mqtt3::MqttFactory
                    .connect("bench", &md)
                    .await?
            }
            Broker::JetStream => {
                daprd_components::jetstream::JetStreamFactory
                    .connect("bench", &md)
                    .await?
            }
            #[cfg(feature = "kafka")]
            Broker::Kafka => {
                daprd_components::kafka::KafkaFactory
                    .connect("bench", &md)
                    .await?
            }
            #[cfg(not(feature = "kafka"))]
            Broker::Kafka => anyhow::bail!("daprd-bench was built without the kafka feature"),
            Broker::Gcp => {
                daprd_components::gcp::GcpPubSubFactory
                    .connect("bench", &md)
                    .await?
            }
            Broker::Pulsar => {
                daprd_components::pulsar::PulsarFactory
                    .connect("bench", &md)
                    .await?
            }
        };
        Ok(Some(c))
    }
}

pub fn port_open(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| std::net::ToSocketAddrs::to_socket_addrs(addr).ok()?.next())
        .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
        .unwrap_or(false)
}

pub struct Sidecar {
    pub child: Child,
    pub http: String,
    pub grpc: String,
    _dir: PathBuf,
    /// The directory of its API sockets, when started with `--unix-domain-socket`.
    unix: Option<PathBuf>,
}

impl Sidecar {
    /// Its resources directory.
    pub fn dir(&self) -> &std::path::Path {
        &self._dir
    }

    fn socket(&self, api: &str) -> Result<PathBuf> {
        let dir = self
            .unix
            .as_ref()
            .context("the sidecar has no Unix domain sockets")?;
        Ok(api_socket(dir, api))
    }

    /// An HTTP client of its HTTP API socket (URLs on [`Sidecar::http`]).
    pub fn uds_http(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .unix_socket(self.socket("http")?)
            .build()?)
    }

    /// A gRPC client of its gRPC API socket.
    pub async fn uds_grpc(
        &self,
    ) -> Result<daprd_proto::runtime::v1::dapr_client::DaprClient<tonic::transport::Channel>> {
        let path = self.socket("grpc")?;
        let channel = tonic::transport::Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        Ok(daprd_proto::runtime::v1::dapr_client::DaprClient::new(
            channel,
        ))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// The socket of `api` (`http`, `grpc`) of the harness's sidecar (app id `bench`) in `dir`.
fn api_socket(dir: &std::path::Path, api: &str) -> PathBuf {
    dir.join(format!("dapr-{api}-bench.socket"))
}

/// Starts daprd with a component per broker; returns it and the exec → outbound-ready time.
pub async fn start_sidecar(
    opts: &Opts,
    brokers: &[Broker],
    app_port: Option<u16>,
) -> Result<(Sidecar, Duration)> {
    start_sidecar_with(opts, brokers, app_port, &[]).await
}

/// [`start_sidecar`] with `extra` flags (they follow the harness's own, so they win).
pub async fn start_sidecar_with(
    opts: &Opts,
    brokers: &[Broker],
    app_port: Option<u16>,
    extra: &[&str],
) -> Result<(Sidecar, Duration)> {
    start_sidecar_under(opts, &[], brokers, app_port, extra).await
}

/// [`start_sidecar_with`], the sidecar started by `wrapper` (`valgrind --tool=callgrind`)
/// when it is not empty.
pub async fn start_sidecar_under(
    opts: &Opts,
    wrapper: &[&str],
    brokers: &[Broker],
    app_port: Option<u16>,
    extra: &[&str],
) -> Result<(Sidecar, Duration)> {
    let daprd = &opts.daprd;
    // The e2e sidecar must not trim undelivered entries: MAXLEN only for the publish rows.
    let redis_maxlen = app_port.is_none();
    let dir = std::env::temp_dir().join(format!(
        "daprd-bench-{}-{}",
        std::process::id(),
        daprd_testkit::free_port()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut yaml = String::new();
    for b in brokers {
        let items: Vec<String> = b
            .metadata(&opts.redis, redis_maxlen)
            .into_iter()
            .map(|(k, v)| format!("{{name: {k}, value: \"{v}\"}}"))
            .collect();
        yaml.push_str(&format!(
            "---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {}}}\nspec: {{type: {}, version: v1, metadata: [{}]}}\n",
            b.component(),
            b.component_type(),
            items.join(", ")
        ));
    }
    std::fs::write(dir.join("c.yaml"), yaml)?;
    let (hp, gp) = (daprd_testkit::free_port(), daprd_testkit::free_port());
    let started = Instant::now();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(daprd);
            c
        }
        None => Command::new(daprd),
    };
    let child = command
        .args(
            app_port
                .map(|p| vec!["--app-port".to_string(), p.to_string()])
                .unwrap_or_default(),
        )
        .args([
            "--app-id",
            "bench",
            "--dapr-http-port",
            &hp.to_string(),
            "--dapr-grpc-port",
            &gp.to_string(),
            "--dapr-listen-addresses",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--metrics-listen-address",
            "127.0.0.1",
            "--log-level",
            "warn",
        ])
        .args(extra)
        .arg("--resources-path")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", daprd.display()))?;
    // With `--unix-domain-socket DIR` the APIs listen on sockets in DIR only.
    let unix = extra
        .iter()
        .position(|f| *f == "--unix-domain-socket")
        .and_then(|i| extra.get(i + 1))
        .map(PathBuf::from);
    let (http, client) = match &unix {
        Some(sockets) => (
            "http://localhost".to_string(),
            reqwest::Client::builder()
                .unix_socket(api_socket(sockets, "http"))
                .build()?,
        ),
        None => (format!("http://127.0.0.1:{hp}"), reqwest::Client::new()),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client
            .get(format!("{http}/v1.0/healthz/outbound"))
            .send()
            .await
        {
            if r.status() == 204 {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("daprd did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready = started.elapsed();
    Ok((
        Sidecar {
            child,
            http,
            grpc: format!("http://127.0.0.1:{gp}"),
            _dir: dir,
            unix,
        },
        ready,
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let opts = parse_args()?;
    if let Some(secs) = opts.soak {
        let doc = soak::run(&opts, secs, opts.soak_rate).await?;
        if let Some(parent) = opts.out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&opts.out, serde_json::to_vec_pretty(&json!({"soak": doc}))?)?;
        println!("results written to {}", opts.out.display());
        return Ok(());
    }
    let all = [
        Broker::Redis,
        Broker::RabbitMq,
        Broker::Mqtt,
        Broker::JetStream,
        Broker::Kafka,
        Broker::Gcp,
        Broker::Pulsar,
        Broker::Memory,
    ];
    // No Pulsar server can be installed here: the rows run against the repository's test
    // broker, in this process.
    let _pulsar = daprd_testkit::pulsar::TestBroker::start(0).await?;
    let _ = PULSAR_URL.set(_pulsar.url());
    let brokers: Vec<Broker> = all
        .into_iter()
        .filter(|b| {
            if *b == Broker::Kafka && !cfg!(feature = "kafka") {
                println!("skipping Kafka: daprd-bench built without the kafka feature");
                return false;
            }
            let up = b
                .address(&opts.redis)
                .map(|a| port_open(&a))
                .unwrap_or(true);
            if !up {
                println!("skipping {:?}: not reachable", b);
            }
            up
        })
        .collect();
    // A part run alone writes its rows under its own key.
    let part = match opts.part {
        Some(Part::Observability) => Some(("observability", observability::run(&opts).await?)),
        Some(Part::Loadgen) => Some(("loadgen", loadgen::run(&opts).await?)),
        Some(Part::Envelope) => Some(("envelope", envelope::run(opts.quick)?)),
        Some(Part::Reload) => Some(("reload", reload::run(&opts).await?)),
        Some(Part::Large) => Some(("large", large::run(&opts).await?)),
        Some(Part::BulkMemory) => Some(("bulk_memory", bulk_memory::run(&opts, &brokers).await?)),
        Some(Part::E2e) => Some(("e2e", e2e::run(&opts).await?)),
        None => None,
    };
    if let Some((key, doc)) = part {
        std::fs::write(&opts.out, serde_json::to_vec_pretty(&json!({ key: doc }))?)?;
        return Ok(());
    }
    let event = json!({"orderId": 1, "pad": "x".repeat(1000)});
    let topic = format!("bench.{}", std::process::id());
    if brokers.contains(&Broker::JetStream) {
        // Dapr's JetStream component needs a stream holding the subject; bounded like Redis.
        let js = async_nats::jetstream::new(async_nats::connect(NATS).await?);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "daprd-bench".into(),
            subjects: vec!["bench.>".into()],
            max_messages: i64::try_from(REDIS_MAXLEN).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the JetStream stream daprd-bench: {e}"))?;
    }

    // Footprint: startup time (exec → outbound ready), then idle RSS.
    let startups = if opts.quick { 3 } else { 20 };
    let mut starts = Vec::new();
    for _ in 0..startups {
        let (s, t) = start_sidecar(&opts, &[Broker::Memory], None).await?;
        starts.push(t.as_secs_f64() * 1000.0);
        drop(s);
    }
    let (sidecar, _) = start_sidecar(&opts, &brokers, None).await?;
    let pid = sidecar.child.id();
    tokio::time::sleep(Duration::from_secs(if opts.quick { 1 } else { 10 })).await;
    let idle_rss = proc::rss_kib(pid);

    let redis_conn = if brokers.contains(&Broker::Redis) {
        let client = redis::Client::open(format!("redis://{}", opts.redis))?;
        Some(redis::aio::ConnectionManager::new(client).await?)
    } else {
        None
    };
    // A second sidecar serving its APIs on Unix domain sockets, for the Redis UDS rows.
    let uds_dir = std::env::temp_dir().join(format!("daprd-bench-uds-{}", std::process::id()));
    let uds_sidecar = if redis_conn.is_some() {
        std::fs::create_dir_all(&uds_dir)?;
        let flag = uds_dir.to_string_lossy().into_owned();
        Some(
            start_sidecar_with(
                &opts,
                &[Broker::Redis],
                None,
                &["--unix-domain-socket", flag.as_str()],
            )
            .await?
            .0,
        )
    } else {
        None
    };
    let mut rows = publish::rows(
        &sidecar,
        &brokers,
        &topic,
        &event,
        redis_conn.as_ref(),
        uds_sidecar.as_ref(),
    )
    .await?;
    if let Some(only) = &opts.only {
        rows.retain(|r| r.name.contains(only.as_str()));
        for r in &mut rows {
            r.baseline = None;
        }
    }
    let mut results = Vec::new();
    for concurrency in [1usize, 16] {
        results.extend(publish::measure(&rows, concurrency, opts.blocks, opts.block, pid).await?);
    }
    let loaded_rss = proc::rss_kib(pid);
    drop(rows);
    drop(sidecar);
    drop(uds_sidecar);
    let _ = std::fs::remove_dir_all(&uds_dir);
    let e2e = if opts.only.is_some() {
        json!(null)
    } else {
        e2e::run(&opts).await?
    };
    let bulk_memory = if opts.only.is_some() {
        json!(null)
    } else {
        bulk_memory::run(&opts, &brokers).await?
    };
    let observability = if opts.only.is_some() {
        json!(null)
    } else {
        observability::run(&opts).await?
    };
    let reload = if opts.only.is_some() || !brokers.contains(&Broker::Redis) {
        json!(null)
    } else {
        reload::run(&opts).await?
    };
    let (loadgen, envelope) = if opts.only.is_some() {
        (json!(null), json!(null))
    } else {
        (loadgen::run(&opts).await?, envelope::run(opts.quick)?)
    };
    let large = if opts.only.is_some() || !brokers.contains(&Broker::Redis) {
        json!(null)
    } else {
        large::run(&opts).await?
    };

    let binary = std::fs::metadata(&opts.daprd).map(|m| m.len()).unwrap_or(0);
    let stripped_path = std::env::temp_dir().join(format!("daprd-stripped-{}", std::process::id()));
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&stripped_path)
        .arg(&opts.daprd)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&stripped_path).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&stripped_path);
    let mut s = starts.clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let p50_start = s.get(s.len() / 2).copied().unwrap_or(0.0);
    let max_start = starts.iter().cloned().fold(0.0, f64::max);
    println!("\nfootprint");
    println!(
        "exec → outbound ready: p50 {p50_start:.1} ms, max {max_start:.1} ms ({} runs)",
        starts.len()
    );
    println!(
        "idle RSS (publish sidecar, {} components): {} KiB; after the publish rows: {} KiB",
        brokers.len(),
        idle_rss.unwrap_or(0),
        loaded_rss.unwrap_or(0)
    );
    println!(
        "binary: {} ({:.1} MB; stripped {})",
        opts.daprd.display(),
        binary as f64 / 1e6,
        stripped
            .map(|b| format!("{:.1} MB", b as f64 / 1e6))
            .unwrap_or_else(|| "n/a".into())
    );
    let doc = json!({
        "quick": opts.quick,
        "daprd": opts.daprd.display().to_string(),
        "blocks": opts.blocks,
        "block_secs": opts.block.as_secs_f64(),
        "brokers": brokers.iter().map(|b| b.component()).collect::<Vec<_>>(),
        "publish": results,
        "end_to_end": e2e,
        "bulk_memory": bulk_memory,
        "observability": observability,
        "reload": reload,
        "loadgen": loadgen,
        "envelope": envelope,
        "large": large,
        "startup_ms": {"p50": p50_start, "max": max_start, "runs": starts.len()},
        "idle_rss_kib": idle_rss,
        "rss_after_load_kib": loaded_rss,
        "binary_bytes": binary,
        "stripped_binary_bytes": stripped,
    });
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)?;
    println!("results written to {}", opts.out.display());
    if let Some(mut conn) = redis_conn {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&topic).query_async(&mut conn).await;
    }
    Ok(())
}
