//! Entity management, Go daprd's default (`disableEntityManagement: false`): before the first
//! send to a topic or queue, and before subscribing, the entity — and a topic's subscription
//! named by `consumerID` — is looked up through Service Bus's ATOM management API and created
//! when missing, with the component's entity properties (`maxDeliveryCount`,
//! `lockDurationInSec`, `defaultMessageTimeToLiveInSec`, `autoDeleteOnIdleInSec`).
//!
//! The API is HTTPS on the namespace's host (`https://<namespace>/<path>?api-version=2021-05`),
//! authorized by a SAS token in the `Authorization` header; with `UseDevelopmentEmulator=true`
//! it is plain HTTP on the endpoint's host and port, as Azure's own SDKs address the emulator.
//! A missing entity is answered 404 or, by Service Bus, 200 with an Atom feed and no entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metadata::{ConnectionString, EntityProperties};
use super::sas::{sas_token, TOKEN_LIFETIME};

/// The ATOM API version Go daprd's admin client asks for.
const API_VERSION: &str = "2021-05";

const ENTRY_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";

/// What went wrong managing an entity.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request did not get an answer (connection, TLS, timeout).
    #[error("{what}: {message}")]
    Http {
        /// What was being done, naming the entity.
        what: String,
        /// The client's error.
        message: String,
    },
    /// The management endpoint answered with an error status.
    #[error("{what}: the management endpoint answered {status}: {body}")]
    Status {
        /// What was being done, naming the entity.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The subscription exists with properties this component cannot use.
    #[error("subscription {subscription} of topic {topic} already exists but {why}")]
    Mismatch {
        /// The topic.
        topic: String,
        /// The subscription.
        subscription: String,
        /// What does not match.
        why: &'static str,
    },
}

impl AdminError {
    /// Whether asking again later may help.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            Self::Http { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            Self::Mismatch { .. } => false,
        }
    }
}

/// A client of the namespace's management API.
pub(super) struct Admin {
    http: reqwest::Client,
    cs: ConnectionString,
    timeout: Duration,
}

impl Admin {
    /// A client for the namespace of `cs`; requests give up after `timeout`.
    ///
    /// # Errors
    /// The HTTP client cannot be built (its TLS roots).
    pub(super) fn new(cs: &ConnectionString, timeout: Duration) -> Result<Self, AdminError> {
        let http = crate::oauth::http_client(None).map_err(|message| AdminError::Http {
            what: "building the management client".into(),
            message,
        })?;
        Ok(Self {
            http,
            cs: cs.clone(),
            timeout,
        })
    }

    /// Creates `topic` if it does not exist.
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<(), AdminError> {
        if self
            .get(topic, &format!("getting topic {topic}"))
            .await?
            .is_none()
        {
            self.create(
                topic,
                "TopicDescription",
                String::new(),
                &format!("creating topic {topic}"),
            )
            .await?;
        }
        Ok(())
    }

    /// Creates `topic` and its subscription `name` if they do not exist; an existing
    /// subscription must require sessions exactly when this one asks for them (Go daprd's
    /// check: a session receiver cannot read a plain subscription, nor a plain one a session
    /// subscription).
    pub(super) async fn ensure_subscription(
        &self,
        topic: &str,
        name: &str,
        props: &EntityProperties,
        sessions: bool,
    ) -> Result<(), AdminError> {
        self.ensure_topic(topic).await?;
        let path = format!("{topic}/Subscriptions/{name}");
        let what = format!("getting subscription {name} of topic {topic}");
        match self.get(&path, &what).await? {
            Some(existing) if requires_session(&existing) != sessions => {
                Err(AdminError::Mismatch {
                    topic: topic.to_string(),
                    subscription: name.to_string(),
                    why: if sessions {
                        "this subscription asks for sessions and the existing one does not require them"
                    } else {
                        "it requires sessions and this subscription does not ask for them"
                    },
                })
            }
            Some(_) => Ok(()),
            None => {
                let what = format!("creating subscription {name} of topic {topic}");
                let body = description(props, sessions);
                self.create(&path, "SubscriptionDescription", body, &what)
                    .await
            }
        }
    }

    /// Creates `queue` (requiring sessions when `sessions`) if it does not exist.
    pub(super) async fn ensure_queue(
        &self,
        queue: &str,
        props: &EntityProperties,
        sessions: bool,
    ) -> Result<(), AdminError> {
        if self
            .get(queue, &format!("getting queue {queue}"))
            .await?
            .is_none()
        {
            let what = format!("creating queue {queue}");
            let body = description(props, sessions);
            self.create(queue, "QueueDescription", body, &what).await?;
        }
        Ok(())
    }

    /// The entity at `path` (its Atom entry), or `None` when there is none.
    async fn get(&self, path: &str, what: &str) -> Result<Option<String>, AdminError> {
        let (status, body) = self.send(reqwest::Method::GET, path, None, what).await?;
        match status {
            404 => Ok(None),
            200 if body.contains("<entry") => Ok(Some(body)),
            // Service Bus answers a missing entity with a feed of nothing
            200 if body.contains("<feed") => Ok(None),
            _ => Err(status_error(what, status, &body)),
        }
    }

    /// Creates the entity at `path` from `kind`'s description (409: made meanwhile by another
    /// sidecar, which is as good).
    async fn create(
        &self,
        path: &str,
        kind: &str,
        properties: String,
        what: &str,
    ) -> Result<(), AdminError> {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><entry xmlns=\"http://www.w3.org/2005/Atom\"><content type=\"application/xml\"><{kind} xmlns=\"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">{properties}</{kind}></content></entry>"
        );
        let (status, answer) = self
            .send(reqwest::Method::PUT, path, Some(body), what)
            .await?;
        match status {
            200 | 201 | 409 => Ok(()),
            _ => Err(status_error(what, status, &answer)),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        what: &str,
    ) -> Result<(u16, String), AdminError> {
        let url = format!("{}/{path}", self.cs.management_endpoint());
        let http_error = |e: reqwest::Error| AdminError::Http {
            what: what.to_string(),
            message: e.to_string(),
        };
        let mut request = self
            .http
            .request(method, &url)
            .query(&[("api-version", API_VERSION)])
            .header("Authorization", self.token(&url).await?)
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request
                .header("Content-Type", ENTRY_CONTENT_TYPE)
                .body(body);
        }
        let response = request.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(http_error)?;
        Ok((status, text))
    }

    /// An Entra ID bearer token, else the connection string's own token, else one signed for
    /// `url`.
    async fn token(&self, url: &str) -> Result<String, AdminError> {
        if let Some(entra) = &self.cs.entra {
            let token = entra
                .token(super::metadata::ENTRA_SCOPE)
                .await
                .map_err(|e| AdminError::Http {
                    what: format!("getting a Microsoft Entra ID token for {url}"),
                    message: e.to_string(),
                })?;
            return Ok(format!("Bearer {token}"));
        }
        if let Some(signature) = &self.cs.signature {
            return Ok(signature.clone());
        }
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + TOKEN_LIFETIME.as_secs();
        Ok(sas_token(
            url,
            self.cs.key_name.as_deref().unwrap_or_default(),
            self.cs.key.as_deref().unwrap_or_default(),
            expiry,
        ))
    }
}

fn status_error(what: &str, status: u16, body: &str) -> AdminError {
    AdminError::Status {
        what: what.to_string(),
        status,
        body: body.chars().take(300).collect(),
    }
}

/// Whether an entity's Atom entry says it requires sessions.
fn requires_session(entry: &str) -> bool {
    entry.contains("<RequiresSession>true</RequiresSession>")
}

/// A queue's or subscription's description elements, in the order Service Bus requires
/// (LockDuration, RequiresSession, DefaultMessageTimeToLive, MaxDeliveryCount,
/// AutoDeleteOnIdle); absent properties keep the server's defaults.
fn description(p: &EntityProperties, sessions: bool) -> String {
    let mut out = String::new();
    let mut element = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            out.push_str(&format!("<{name}>{v}</{name}>"));
        }
    };
    element("LockDuration", p.lock_duration_secs.map(iso_duration));
    element("RequiresSession", sessions.then(|| "true".to_string()));
    element(
        "DefaultMessageTimeToLive",
        p.default_ttl_secs.map(iso_duration),
    );
    element(
        "MaxDeliveryCount",
        p.max_delivery_count.map(|n| n.to_string()),
    );
    element(
        "AutoDeleteOnIdle",
        p.auto_delete_on_idle_secs.map(iso_duration),
    );
    out
}

/// `secs` as an ISO 8601 duration the way Go daprd writes it: days, then `T` with hours,
/// minutes and seconds, zero parts left out (`P0D` for nothing, `P1D`, `PT1M30S`).
fn iso_duration(secs: u64) -> String {
    if secs == 0 {
        return "P0D".into();
    }
    let mut out = String::from("P");
    if secs >= 86_400 {
        out.push_str(&format!("{}D", secs / 86_400));
    }
    let rest = secs % 86_400;
    if rest == 0 {
        return out;
    }
    out.push('T');
    for (n, unit) in [
        (rest / 3600, 'H'),
        (rest % 3600 / 60, 'M'),
        (rest % 60, 'S'),
    ] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_go_daprd_writes_them() {
        assert_eq!(iso_duration(0), "P0D");
        assert_eq!(iso_duration(86_400), "P1D");
        assert_eq!(iso_duration(90), "PT1M30S");
        assert_eq!(iso_duration(3600), "PT1H");
        assert_eq!(iso_duration(2 * 86_400 + 3661), "P2DT1H1M1S");
        assert_eq!(iso_duration(300), "PT5M");
    }

    #[test]
    fn descriptions_keep_service_bus_element_order_and_skip_absent_properties() {
        let all = EntityProperties {
            max_delivery_count: Some(3),
            lock_duration_secs: Some(30),
            default_ttl_secs: Some(86_400),
            auto_delete_on_idle_secs: Some(600),
        };
        assert_eq!(
            description(&all, true),
            "<LockDuration>PT30S</LockDuration><RequiresSession>true</RequiresSession><DefaultMessageTimeToLive>P1D</DefaultMessageTimeToLive><MaxDeliveryCount>3</MaxDeliveryCount><AutoDeleteOnIdle>PT10M</AutoDeleteOnIdle>"
        );
        let some = EntityProperties {
            max_delivery_count: Some(7),
            ..EntityProperties::default()
        };
        assert_eq!(
            description(&some, false),
            "<MaxDeliveryCount>7</MaxDeliveryCount>"
        );
    }
}
