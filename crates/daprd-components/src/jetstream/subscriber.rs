//! The JetStream consume loop: one task per subscription takes the push consumer's messages, drops
//! a redelivered copy of a message in hand or already settled, hands the rest to the runtime
//! (progress acks every half `ackWait` while the app works) and acks or naks by the outcome; no
//! delivery starts after a stop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::stop::Stop;
use async_nats::jetstream::consumer::push::Messages;
use async_nats::jetstream::AckKind;
use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome};
use futures::StreamExt;

use super::metadata::JetStreamMetadata;

/// What a subscription knows of the stream sequences it was handed: the ones in the app's
/// hands, and the last [`SEEN_SETTLED`] it acknowledged.
#[derive(Default)]
struct Seen {
    in_hand: std::collections::HashSet<u64>,
    settled: std::collections::HashSet<u64>,
    settled_order: std::collections::VecDeque<u64>,
}

const SEEN_SETTLED: usize = 10_000;

enum Admit {
    Deliver,
    InHand,
    Settled,
}

impl Seen {
    fn admit(&mut self, seq: u64) -> Admit {
        if self.in_hand.contains(&seq) {
            Admit::InHand
        } else if self.settled.contains(&seq) {
            Admit::Settled
        } else {
            self.in_hand.insert(seq);
            Admit::Deliver
        }
    }

    fn done(&mut self, seq: u64, acked: bool) {
        self.in_hand.remove(&seq);
        if acked && self.settled.insert(seq) {
            self.settled_order.push_back(seq);
            if self.settled_order.len() > SEEN_SETTLED {
                if let Some(old) = self.settled_order.pop_front() {
                    self.settled.remove(&old);
                }
            }
        }
    }
}

/// One subscription's consume loop.
pub(super) struct ConsumeLoop {
    pub(super) messages: Messages,
    pub(super) stop: Stop,
    pub(super) component: String,
    pub(super) topic: String,
    pub(super) md: Arc<JetStreamMetadata>,
    pub(super) handler: Handler,
    /// Held by the loop and by each delivery until its ack or nak is sent.
    pub(super) guard: DrainGuard,
}

impl ConsumeLoop {
    pub(super) async fn run(self) {
        let ConsumeLoop {
            mut messages,
            mut stop,
            component,
            topic,
            md,
            handler,
            guard,
        } = self;
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        loop {
            // A stop wins over a message that is ready: no delivery starts after it.
            let Some(Some(next)) = stop.or(messages.next()).await else {
                return;
            };
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%component, %topic, error = %e, "jetstream message error");
                    continue;
                }
            };
            // The server redelivers a message `ackWait` after it pushed it, even while it
            // waits here behind a slow handler: a copy of a message in the app's hands is
            // dropped (the first delivery's ack settles it), a copy of one already
            // accepted is acknowledged again, never handed to the app a second time.
            let info = msg.info().ok().map(|i| (i.stream_sequence, i.delivered));
            let stream_seq = info.map(|(seq, _)| seq);
            let redelivered = info.is_some_and(|(_, delivered)| delivered > 1);
            if let Some(seq) = stream_seq {
                let verdict = seen.lock().unwrap_or_else(|p| p.into_inner()).admit(seq);
                match verdict {
                    Admit::Deliver => {}
                    Admit::InHand => continue,
                    Admit::Settled => {
                        let _ = msg.ack().await;
                        continue;
                    }
                }
            }
            let seen = seen.clone();
            let handler = handler.clone();
            let parallel = md.parallel;
            let md = md.clone();
            let topic = topic.clone();
            let component = component.clone();
            let settling = guard.clone();
            let work = async move {
                let _settling = settling;
                let m = Message {
                    topic: topic.clone(),
                    data: msg.payload.clone(),
                    metadata: [("Topic".to_string(), msg.subject.to_string())]
                        .into_iter()
                        .collect::<BTreeMap<_, _>>(),
                    content_type: None,
                    redelivered,
                };
                // While the app works on it, tell the server every half `ackWait` (30 s
                // by default) that the message is in progress: otherwise it is delivered
                // again, to this or another subscriber, while the first handler still runs.
                let outcome = if md.ack_policy == "none" {
                    handler(m).await
                } else {
                    let work = handler(m);
                    tokio::pin!(work);
                    let period = (md.ack_wait.unwrap_or(Duration::from_secs(30)) / 2)
                        .max(Duration::from_millis(100));
                    loop {
                        tokio::select! {
                            o = &mut work => break o,
                            _ = tokio::time::sleep(period) => {
                                let _ = msg.ack_with(AckKind::Progress).await;
                            }
                        }
                    }
                };
                if md.ack_policy == "none" {
                    if let Some(seq) = stream_seq {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .done(seq, true);
                    }
                    return;
                }
                let res = match outcome {
                    Outcome::Success | Outcome::Drop => msg.ack().await,
                    Outcome::Retry => msg.ack_with(AckKind::Nak(md.ack_wait)).await,
                };
                if let Some(seq) = stream_seq {
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .done(seq, res.is_ok() && outcome != Outcome::Retry);
                }
                if let Err(e) = res {
                    tracing::warn!(%component, %topic, error = %e, "jetstream ack/nak failed; the server will redeliver");
                }
            };
            if parallel {
                tokio::spawn(work);
            } else {
                work.await;
            }
        }
    }
}
