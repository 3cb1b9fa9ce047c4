//! Where the component's connections come from: one node (`redisType: node`), a Redis
//! Cluster (`redisType: cluster`, `redisHost` a comma list of nodes), or the master that
//! Redis Sentinel names (`failover: true`, `redisHost` the Sentinel(s)).
//! Commands name one stream key each, so the cluster client routes them by slot.

use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::metadata::RedisMetadata;

/// First pause between reconnect attempts of the shared connection.
const RECONNECT_MIN_DELAY: std::time::Duration = std::time::Duration::from_millis(50);
/// Longest pause between reconnect attempts: a broker that is back is used within this.
const RECONNECT_MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// Attempts of one reconnect round (about 1.5 s in all); a command during an outage waits for
/// the round and then fails.
const RECONNECT_ATTEMPTS: usize = 8;

/// Builds connections for one component.
#[derive(Clone)]
pub(super) enum Source {
    Node(Arc<redis::Client>),
    Cluster(Arc<ClusterClient>),
    /// `failover: true`: the master that Sentinel names (asked again after an error).
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

/// A connection of either kind; every command goes through [`ConnectionLike`].
#[derive(Clone)]
pub(super) enum Conn {
    /// Shared, reconnecting (publishes, acks, the reclaim loop).
    Manager(ConnectionManager),
    /// Dedicated to one reader's blocking `XREADGROUP`.
    Multiplexed(MultiplexedConnection),
    /// A cluster connection (reconnects to nodes by itself).
    Cluster(ClusterConnection),
    /// The Sentinel-named master, shared; dropped after a connection error or `READONLY`
    /// (a demoted master) so the next command asks Sentinel again.
    Sentinel(SentinelConn),
}

/// A shared connection to the current master.
#[derive(Clone)]
pub(super) struct SentinelConn {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    current: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    config: redis::AsyncConnectionConfig,
    db: i64,
}

impl SentinelConn {
    fn config_db(&self) -> i64 {
        self.db
    }

    async fn get(&self) -> RedisResult<MultiplexedConnection> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .sentinel
            .lock()
            .await
            .get_async_connection_with_config(&self.config)
            .await?;
        *current = Some(c.clone());
        Ok(c)
    }

    async fn after<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            let demoted = e.to_string().contains("READONLY");
            if demoted || e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                *self.current.lock().await = None;
            }
        }
        result
    }
}

fn tls_certificates(md: &RedisMetadata) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: md
            .tls
            .client_cert
            .as_ref()
            .zip(md.tls.client_key.as_ref())
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone().into_bytes(),
                client_key: key.clone().into_bytes(),
            }),
        root_cert: None,
    }
}

impl Source {
    /// Parses the addresses (no I/O).
    pub(super) fn new(md: &RedisMetadata) -> RedisResult<Self> {
        if let Some(master) = &md.sentinel_master {
            let sentinels: Vec<String> = md.hosts().map(|h| md.sentinel_url(h)).collect();
            let mut node = redis::RedisConnectionInfo::default().set_db(md.db);
            if let Some(u) = &md.username {
                node = node.set_username(u);
            }
            if let Some(p) = &md.password {
                node = node.set_password(p);
            }
            let client = SentinelClient::build(
                sentinels,
                master.as_str(),
                Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node)),
                SentinelServerType::Master,
            )?;
            return Ok(Self::Sentinel(Arc::new(tokio::sync::Mutex::new(client))));
        }
        if md.cluster {
            let urls: Vec<String> = md.hosts().map(|h| md.url_for(h)).collect();
            let mut builder = ClusterClient::builder(urls)
                .connection_timeout(md.dial_timeout)
                .response_timeout(md.write_timeout.max(md.read_timeout));
            if md.enable_tls {
                builder = builder.certs(tls_certificates(md));
            }
            return Ok(Self::Cluster(Arc::new(builder.build()?)));
        }
        let url = md.url_for(&md.host);
        let client = if md.enable_tls {
            redis::Client::build_with_tls(url, tls_certificates(md))?
        } else {
            redis::Client::open(url)?
        };
        Ok(Self::Node(Arc::new(client)))
    }

    /// The shared connection.
    pub(super) async fn shared(&self, md: &RedisMetadata) -> RedisResult<Conn> {
        match self {
            Self::Node(client) => {
                // Reconnect attempts at most RECONNECT_MAX_DELAY apart: with the client's
                // default (doubling from 100 ms, no ceiling) publishing stayed broken for up
                // to 6 s after the broker came back. When the attempts run out, the next
                // command starts a new round at once.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(md.dial_timeout))
                    .set_response_timeout(Some(md.write_timeout.max(md.read_timeout)))
                    .set_min_delay(RECONNECT_MIN_DELAY)
                    .set_max_delay(RECONNECT_MAX_DELAY)
                    .set_number_of_retries(RECONNECT_ATTEMPTS);
                Ok(Conn::Manager(
                    ConnectionManager::new_with_config((**client).clone(), config).await?,
                ))
            }
            Self::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
            Self::Sentinel(sentinel) => {
                let conn = SentinelConn {
                    sentinel: sentinel.clone(),
                    current: Arc::default(),
                    config: redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(md.dial_timeout))
                        .set_response_timeout(Some(md.write_timeout.max(md.read_timeout))),
                    db: md.db,
                };
                conn.get().await?;
                Ok(Conn::Sentinel(conn))
            }
        }
    }

    /// A connection of its own for a reader: `XREADGROUP ... BLOCK` holds a connection for
    /// up to `readTimeout`, so the reply may take that long.
    pub(super) async fn dedicated(&self, md: &RedisMetadata) -> RedisResult<Conn> {
        let response = md.read_timeout + std::time::Duration::from_secs(5);
        match self {
            Self::Node(client) => Ok(Conn::Multiplexed(
                client
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(md.dial_timeout))
                            .set_response_timeout(Some(response)),
                    )
                    .await?,
            )),
            Self::Cluster(client) => Ok(Conn::Cluster(
                client
                    .get_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(md.dial_timeout)
                            .set_response_timeout(response),
                    )
                    .await?,
            )),
            // The reader drops its connection on any error and asks for a new one: a fresh
            // master lookup each time.
            Self::Sentinel(sentinel) => Ok(Conn::Multiplexed(
                sentinel
                    .lock()
                    .await
                    .get_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(md.dial_timeout))
                            .set_response_timeout(Some(response)),
                    )
                    .await?,
            )),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let result = match s.get().await {
                    Ok(mut c) => c.req_packed_command(cmd).await,
                    Err(e) => Err(e),
                };
                s.after(result).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let result = match s.get().await {
                    Ok(mut c) => c.req_packed_commands(pipeline, offset, count).await,
                    Err(e) => Err(e),
                };
                s.after(result).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.config_db(),
        }
    }
}
