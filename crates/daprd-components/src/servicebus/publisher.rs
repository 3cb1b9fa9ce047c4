//! The publishing side of an Azure messaging namespace (Service Bus and Event Hubs alike): one
//! connection, opened again when it was lost, with a sender link per entity, attached after
//! the entity's token is put and authorized again before the token runs out; a batch of
//! messages goes out at once and each one's outcome is waited for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::Sender;
use fe2o3_amqp::types::messaging::{Data, Message, Outcome};
use tokio::sync::Mutex;

use super::amqp::{self, AmqpError, Conn};
use super::metadata::ConnectionString;
use super::TOKEN_REFRESH;

type SharedSender = Arc<Mutex<Sender>>;

/// A namespace's publishing connection and its senders.
pub(crate) struct Publisher {
    connection: ConnectionString,
    timeout: Duration,
    state: Mutex<State>,
}

struct State {
    conn: Option<Conn>,
    /// Each entity's sender and when its token was last put.
    senders: HashMap<String, (SharedSender, Instant)>,
}

impl Publisher {
    /// A publisher on `conn` (opened when `None`, at the first send) to the namespace of
    /// `connection`; `timeout` bounds each step.
    pub(crate) fn new(connection: ConnectionString, timeout: Duration, conn: Option<Conn>) -> Self {
        Self {
            connection,
            timeout,
            state: Mutex::new(State {
                conn,
                senders: HashMap::new(),
            }),
        }
    }

    /// The sender of `entity`, attached (with its token) on the connection, which is opened
    /// again if it was dropped.
    async fn sender(&self, entity: &str) -> Result<SharedSender, AmqpError> {
        let mut guard = self.state.lock().await;
        let p = &mut *guard;
        if p.conn.as_ref().is_some_and(Conn::is_closed) {
            p.senders.clear();
            if let Some(conn) = p.conn.take() {
                tokio::spawn(conn.close());
            }
        }
        if let Some((s, authorized)) = p.senders.get(entity) {
            if authorized.elapsed() < TOKEN_REFRESH {
                return Ok(s.clone());
            }
        }
        let conn = match p.conn.as_mut() {
            Some(c) => c,
            None => p
                .conn
                .insert(Conn::open(&self.connection, self.timeout).await?),
        };
        conn.authorize(entity).await?;
        if let Some((s, authorized)) = p.senders.get_mut(entity) {
            *authorized = Instant::now();
            return Ok(s.clone());
        }
        let sender = Arc::new(Mutex::new(conn.sender(entity).await?));
        p.senders
            .insert(entity.to_string(), (sender.clone(), Instant::now()));
        Ok(sender)
    }

    /// Forgets the connection after a failure: the next send opens a new one.
    pub(crate) async fn reset(&self) {
        let mut p = self.state.lock().await;
        p.senders.clear();
        if let Some(conn) = p.conn.take() {
            tokio::spawn(conn.close());
        }
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        let mut p = self.state.lock().await;
        p.senders.clear();
        if let Some(conn) = p.conn.take() {
            conn.close().await;
        }
    }

    /// Sends `messages` to `entity` at once and waits for each outcome.
    pub(crate) async fn send_all(
        &self,
        entity: &str,
        messages: Vec<Message<Data>>,
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        let sender = self.sender(entity).await?;
        let what = format!("publishing to {entity}");
        let pending = amqp::within(self.timeout, &what, async {
            let mut s = sender.lock().await;
            let mut pending = Vec::with_capacity(messages.len());
            for m in messages {
                pending.push(s.send_batchable(m).await.map_err(|e| AmqpError::Link {
                    what: what.clone(),
                    message: e.to_string(),
                })?);
            }
            Ok(pending)
        })
        .await?;
        // A connection that dies with transfers in flight does not answer them: the wait
        // ends when it is seen closed (checked every 100 ms), not at the timeout.
        let outcomes = amqp::within(self.timeout, &what, async {
            let all = futures::future::join_all(pending);
            tokio::pin!(all);
            loop {
                tokio::select! {
                    outcomes = &mut all => return Ok(outcomes),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        let p = self.state.lock().await;
                        if p.conn.as_ref().is_none_or(Conn::is_closed) {
                            return Err(AmqpError::Link {
                                what: what.clone(),
                                message: "the connection closed before the broker answered".into(),
                            });
                        }
                    }
                }
            }
        })
        .await?;
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                Ok(Outcome::Accepted(_)) => Ok(()),
                Ok(Outcome::Rejected(r)) => Err(AmqpError::Refused {
                    what: what.clone(),
                    reason: r
                        .error
                        .map(|e| {
                            format!("{:?}: {}", e.condition, e.description.unwrap_or_default())
                        })
                        .unwrap_or_else(|| "rejected".into()),
                }),
                Ok(other) => Err(AmqpError::Refused {
                    what: what.clone(),
                    reason: format!("{other:?}"),
                }),
                Err(e) => Err(AmqpError::Link {
                    what: what.clone(),
                    message: e.to_string(),
                }),
            })
            .collect())
    }
}
