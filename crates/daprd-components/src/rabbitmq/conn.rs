//! The connection: opening it (attempts side by side while the broker does not answer) and
//! declaring exchanges, for the publisher and the subscriptions alike.

use std::time::Duration;

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::metadata::RabbitMetadata;

/// How long a connection attempt may go unanswered before another is started beside it.
const HEDGE_AFTER: Duration = Duration::from_millis(500);
/// Most connection attempts in flight at once.
const MAX_ATTEMPTS: usize = 8;
/// How long connecting may take in all (RabbitMQ's own handshake timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("no answer from the broker within {0:?}")]
    TimedOut(Duration),
}

/// Connects and opens the channel, starting another attempt beside those in flight each
/// [`HEDGE_AFTER`] they go unanswered, and keeping the first that succeeds (the others are
/// dropped). A RabbitMQ node that is still booting accepts connections it never answers
/// (until its handshake timeout closes them), while one made once it has booted is answered
/// at once: a single attempt would hold every publish for seconds after the broker's
/// return. An attempt that fails (refused: the broker is down) ends it at once.
pub(super) async fn open(md: &RabbitMetadata) -> Result<(Connection, Channel), OpenError> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let deadline = tokio::time::sleep(CONNECT_TIMEOUT);
    tokio::pin!(deadline);
    let mut hedge =
        tokio::time::interval_at(tokio::time::Instant::now() + HEDGE_AFTER, HEDGE_AFTER);
    let mut attempts = FuturesUnordered::new();
    attempts.push(open_once(md));
    loop {
        tokio::select! {
            Some(result) = attempts.next() => match result {
                Ok(opened) => return Ok(opened),
                Err(e) if attempts.is_empty() => return Err(e.into()),
                Err(_) => {}
            },
            _ = hedge.tick(), if attempts.len() < MAX_ATTEMPTS => attempts.push(open_once(md)),
            _ = &mut deadline => return Err(OpenError::TimedOut(CONNECT_TIMEOUT)),
        }
    }
}

/// One connection attempt: connect, open the channel, select confirms when asked for.
async fn open_once(md: &RabbitMetadata) -> Result<(Connection, Channel), lapin::Error> {
    let mut props = ConnectionProperties::default();
    if let Some(name) = &md.client_name {
        props = props.with_connection_name(name.clone().into());
    }
    let uri = if md.uri.contains('?') || md.heartbeat.is_zero() {
        md.uri.clone()
    } else {
        format!("{}?heartbeat={}", md.uri, md.heartbeat.as_secs())
    };
    let conn = if uri.starts_with("amqps://") {
        // SASL EXTERNAL: the broker takes the user from the client certificate.
        let uri = if md.sasl_external {
            let sep = if uri.contains('?') { '&' } else { '?' };
            format!("{uri}{sep}auth_mechanism=external")
        } else {
            uri
        };
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: md
                .tls
                .client_cert
                .as_ref()
                .zip(md.tls.client_key.as_ref())
                .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: cert.clone().into_bytes(),
                    key: key.clone().into_bytes(),
                }),
            cert_chain: md.tls.ca_cert.clone(),
        };
        Connection::connect_with_config(&uri, props, tls, lapin::runtime::default_runtime()?)
            .await?
    } else {
        Connection::connect(&uri, props).await?
    };
    let channel = conn.create_channel().await?;
    if md.publisher_confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    Ok((conn, channel))
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Fanout,
    }
}

pub(super) async fn declare_exchange(
    ch: &Channel,
    md: &RabbitMetadata,
    name: &str,
    kind: &str,
    durable: bool,
) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        name.into(),
        exchange_kind(kind),
        ExchangeDeclareOptions {
            durable,
            auto_delete: md.deleted_when_unused,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}
