//! The component's producer: librdkafka's producer, each record's delivery report answered on
//! a oneshot channel, served by a polling thread of our own.
//!
//! rdkafka's `FutureProducer` polls in 100 ms rounds, and each round ends in a busy loop: the
//! time left is handed to librdkafka truncated to whole milliseconds, so the wait returns up to
//! a millisecond early and the rest is spun. That is ~1 % of a core for an idle sidecar. Here a
//! round lasts [`POLL_ROUND`], which bounds that spin to ~0.05 %; delivery reports are still
//! served the moment they arrive (the wait wakes for them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

/// How long one poll of the producer's thread lasts.
const POLL_ROUND: Duration = Duration::from_secs(2);

/// Where a record's delivery report goes.
pub type Opaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

/// A record to send, with its delivery report's channel.
pub type Record<'a> = BaseRecord<'a, str, [u8], Opaque>;

/// Keeps the last client-level error librdkafka reports (a refused SASL login, a failed TLS
/// handshake, a refused connection): those reach only this callback, and a component that
/// fails to start names them. Clones share the record.
#[derive(Clone, Default)]
pub struct LastError(Arc<Mutex<Option<(KafkaError, String)>>>);

impl LastError {
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn get(&self) -> Option<(KafkaError, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Whether librdkafka's error means the broker refused this client's credentials or TLS
/// handshake (retrying will not help).
pub fn is_refusal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::UnsupportedSASLMechanism
                | RDKafkaErrorCode::IllegalSASLState
                | RDKafkaErrorCode::SSL
        )
    )
}

/// librdkafka's own log lines as tracing events (target `librdkafka`): the client library
/// logs through the `log` crate, which the sidecar's tracing subscriber does not read.
pub(super) fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "{facility}: {message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{facility}: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "{facility}: {message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{facility}: {message}"),
    }
}

impl ClientContext for LastError {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "kafka client: {error}: {reason}");
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // "all brokers are down" follows a refused login; the refusal is the news
        let consequence = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
            && last.as_ref().is_some_and(|(k, _)| is_refusal(k));
        if !consequence {
            *last = Some((error, reason.to_string()));
        }
    }
}

impl ProducerContext for LastError {
    type DeliveryOpaque = Opaque;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Opaque) {
        let _ = report.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// Stops the polling thread when the last producer handle goes.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A shareable producer; its polling thread ends (within [`POLL_ROUND`], without being
/// waited for) once every clone is dropped.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: Arc<BaseProducer<LastError>>,
    _poller: Arc<StopOnDrop>,
}

impl KafkaProducer {
    /// Creates the producer and starts its polling thread.
    ///
    /// # Errors
    /// librdkafka refuses the configuration, or the thread cannot start.
    pub fn new(config: &ClientConfig, errors: LastError) -> KafkaResult<Self> {
        let inner: Arc<BaseProducer<LastError>> = Arc::new(config.create_with_context(errors)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, stopped) = (inner.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka producer".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL_ROUND);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("starting the polling thread: {e}")))?;
        Ok(Self {
            inner,
            _poller: Arc::new(StopOnDrop(stop)),
        })
    }

    /// The client (metadata requests).
    pub fn client(&self) -> &Client<LastError> {
        self.inner.client()
    }

    /// Queues `record`; its delivery report comes on the returned channel.
    ///
    /// # Errors
    /// librdkafka refuses the record (its queue is full, the record is too large...).
    pub fn enqueue<'a>(
        &self,
        record: impl FnOnce(Opaque) -> Record<'a>,
    ) -> Result<oneshot::Receiver<Result<(), KafkaError>>, KafkaError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .send(record(Box::new(tx)))
            .map(|()| rx)
            .map_err(|(e, _)| e)
    }

    /// Sends a record and waits for its delivery report; a full queue is retried until
    /// `queue_timeout`.
    ///
    /// # Errors
    /// The broker's or librdkafka's error for this record.
    pub async fn send<'a>(
        &self,
        record: impl Fn(Opaque) -> Record<'a>,
        queue_timeout: Duration,
    ) -> Result<(), KafkaError> {
        let deadline = tokio::time::Instant::now() + queue_timeout;
        let report = loop {
            match self.enqueue(&record) {
                Ok(report) => break report,
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        };
        report.await.unwrap_or(Err(KafkaError::Canceled))
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}
