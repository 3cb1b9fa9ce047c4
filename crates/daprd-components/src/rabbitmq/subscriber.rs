//! The RabbitMQ consume loop: one task per subscription declares its queue and binding, consumes
//! with prefetch, hands each delivery to the runtime and acks, nacks or requeues by its outcome;
//! it reconnects after `reconnectWaitSeconds` and drains its deliveries on stop.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use daprd_core::pubsub::{Handler, Message, Outcome};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};

use super::conn::{declare_exchange, open};
use super::metadata::{get_ci, RabbitMetadata};
use crate::stop::Stop;

/// Consecutive deliveries the app did not accept, for the pause before a requeue.
#[derive(Default)]
pub(super) struct Failures(std::sync::atomic::AtomicU32);

impl Failures {
    /// Counts one more failure; the pause before its requeue (`backoff::RETRY`).
    pub(super) fn pause(&self) -> std::time::Duration {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        daprd_core::backoff::RETRY.after(n)
    }

    pub(super) fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(super) struct SubscriptionTask {
    pub(super) failures: Failures,
    pub(super) component: String,
    pub(super) md: Arc<RabbitMetadata>,
    pub(super) topic: String,
    pub(super) queue: String,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) handler: Handler,
}

impl SubscriptionTask {
    pub(super) async fn prepare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let md = &self.md;
        declare_exchange(ch, md, &self.topic, &md.exchange_kind, md.durable).await?;
        let mut args = FieldTable::default();
        if md.enable_dead_letter {
            let dlx = format!("dlx-{}", self.queue);
            let dlq = format!("dlq-{}", self.queue);
            declare_exchange(ch, md, &dlx, "fanout", true).await?;
            ch.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: md.deleted_when_unused,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.queue_bind(
                dlq.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.into()),
            );
        }
        if let Some(n) = md.max_len {
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
        }
        if let Some(n) = md.max_len_bytes {
            args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(n));
        }
        if let Some(p) = get_ci(&self.metadata, "maxPriority").and_then(|v| v.parse::<u8>().ok()) {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
        }
        let queue_type = get_ci(&self.metadata, "queueType").unwrap_or("classic");
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.into()),
        );
        if get_ci(&self.metadata, "singleActiveConsumer")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                durable: md.durable,
                auto_delete: md.deleted_when_unused,
                ..Default::default()
            },
            args,
        )
        .await?;
        if md.prefetch_count > 0 {
            ch.basic_qos(md.prefetch_count, BasicQosOptions::default())
                .await?;
        }
        let keys: Vec<&str> = get_ci(&self.metadata, "routingKey")
            .map(|k| k.split(',').map(str::trim).collect())
            .unwrap_or_else(|| vec![""]);
        for key in keys {
            ch.queue_bind(
                self.queue.as_str().into(),
                self.topic.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }

    /// Consumes until cancelled or the component stops, reconnecting after errors. On a stop
    /// it cancels the consumer, waits until every delivery it started has been acked or
    /// nacked, and only then closes the connection (closing it earlier made the broker
    /// redeliver messages the app had accepted). Prefetched deliveries that were never
    /// handed over go back to the queue with the channel. `_guard` is held until then.
    pub(super) async fn run(
        self: Arc<Self>,
        first: Option<(Connection, Channel, lapin::Consumer)>,
        mut stop: Stop,
        _guard: daprd_core::pubsub::DrainGuard,
    ) {
        let (mut first, mut consumer) = match first {
            Some((conn, ch, consumer)) => (Some((conn, ch)), Some(consumer)),
            None => (None, None),
        };
        loop {
            let (conn, ch) = match first.take() {
                Some(c) => c,
                None => match open(&self.md).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq subscriber cannot connect; retrying");
                        if self.wait(&mut stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let mut consumer: lapin::Consumer = match consumer.take() {
                Some(c) => c,
                None => match self.consume(&ch).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq subscription failed; retrying");
                        if self.wait(&mut stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            // Held by every delivery of this connection until it is settled.
            let (settling, settled) = daprd_core::pubsub::drain_tracker();
            loop {
                // A stop wins over a delivery that is ready: none starts after it.
                let Some(next) = stop.or(consumer.next()).await else {
                    let _ = ch
                        .basic_cancel(
                            consumer.tag(),
                            lapin::options::BasicCancelOptions::default(),
                        )
                        .await;
                    drop(settling);
                    settled.wait().await;
                    let _ = conn.close(200, "unsubscribed".into()).await;
                    return;
                };
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq consumer error; reconnecting");
                        break;
                    }
                    None => break,
                };
                let me = self.clone();
                let settling = settling.clone();
                let mut stopping = stop.clone();
                let work = async move {
                    let _settling = settling;
                    let mut metadata = BTreeMap::new();
                    if me.md.properties_to_metadata {
                        if let Some(v) = delivery.properties.message_id() {
                            metadata.insert("metadata.messageid".to_string(), v.to_string());
                        }
                        if let Some(v) = delivery.properties.correlation_id() {
                            metadata.insert("metadata.correlationid".to_string(), v.to_string());
                        }
                        if let Some(v) = delivery.properties.content_type() {
                            metadata.insert("metadata.contenttype".to_string(), v.to_string());
                        }
                    }
                    let msg = Message {
                        topic: me.topic.clone(),
                        data: Bytes::from(delivery.data.clone()),
                        metadata,
                        content_type: None,
                        redelivered: delivery.redelivered,
                    };
                    let outcome = (me.handler)(msg).await;
                    if me.md.auto_ack {
                        return;
                    }
                    let res = match outcome {
                        Outcome::Success | Outcome::Drop => {
                            delivery.acker.ack(BasicAckOptions::default()).await
                        }
                        Outcome::Retry => {
                            // A requeued message comes straight back: pause first (growing
                            // while the app keeps failing, cut short by a stop) so an app
                            // that is down does not cost a busy loop.
                            if me.md.requeue_in_failure {
                                stopping.sleep(me.failures.pause()).await;
                            }
                            delivery
                                .acker
                                .nack(BasicNackOptions {
                                    requeue: me.md.requeue_in_failure,
                                    ..Default::default()
                                })
                                .await
                        }
                    };
                    if matches!(outcome, Outcome::Success | Outcome::Drop) {
                        me.failures.reset();
                    }
                    if let Err(e) = res {
                        tracing::warn!(component = %me.component, queue = %me.queue, error = %e, "rabbitmq ack/nack failed; the broker will redeliver");
                    }
                };
                if self.md.parallel {
                    tokio::spawn(work);
                } else {
                    work.await;
                }
            }
            if self.wait(&mut stop).await {
                return;
            }
        }
    }

    /// Declares the exchange, queue and bindings on `ch` and starts consuming the queue.
    pub(super) async fn consume(&self, ch: &Channel) -> Result<lapin::Consumer, lapin::Error> {
        self.prepare(ch).await?;
        let tag: ShortString =
            format!("{}-{}", self.md.consumer_id, uuid::Uuid::new_v4().simple()).into();
        ch.basic_consume(
            self.queue.as_str().into(),
            tag,
            BasicConsumeOptions {
                no_ack: self.md.auto_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    }

    /// Sleeps `reconnectWaitSeconds`; true when the subscription should end instead.
    pub(super) async fn wait(&self, stop: &mut Stop) -> bool {
        stop.sleep(
            self.md
                .reconnect_wait
                .max(std::time::Duration::from_millis(100)),
        )
        .await
    }
}
