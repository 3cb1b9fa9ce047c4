//! Azure Blob Storage as Event Hubs' checkpoint store, in the layout Azure's Event Hubs SDKs
//! (and so Go daprd) use, so that a consumer group's position carries over between them:
//! under the container `storageContainerName`, one empty blob per partition and per kind,
//! `<namespace>/<event hub>/<consumer group>/checkpoint/<partition>` (metadata `offset` and
//! `sequencenumber`) and `…/ownership/<partition>` (metadata `ownerid`; its ETag makes a claim
//! conditional, so two consumers cannot both take a partition). Names are lowercase, as the
//! SDKs write them.
//!
//! Blob Storage's REST API is spoken with reqwest and Shared Key authorization (HMAC-SHA256 of
//! the request's canonical form with the account key): `storageAccountName` with
//! `storageAccountKey`, or `storageConnectionString` (`AccountName`, `AccountKey`, and
//! `BlobEndpoint` or `DefaultEndpointsProtocol`/`EndpointSuffix`; `UseDevelopmentStorage=true`
//! for Azurite's well-known account on 127.0.0.1:10000).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// Blob Storage's REST API version the requests ask for.
const API_VERSION: &str = "2021-08-06";

/// Azurite's (and the storage emulator's) well-known development account.
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// What went wrong with the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The storage settings are incomplete or malformed.
    #[error("storage settings: {0}")]
    Settings(String),
    /// The request failed on the way.
    #[error("{what}: {message}")]
    Http {
        /// The operation.
        what: String,
        /// Why.
        message: String,
    },
    /// Blob Storage answered with an error status.
    #[error("{what}: blob storage answered {status}: {body}")]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
}

/// A storage account's Blob endpoint and key.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageAccount {
    /// The account name.
    pub name: String,
    key: Vec<u8>,
    /// The Blob service's base URL: `https://<account>.blob.core.windows.net`, or
    /// `http://127.0.0.1:10000/devstoreaccount1` (path-style, as Azurite).
    pub endpoint: String,
}

impl std::fmt::Debug for StorageAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageAccount")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl StorageAccount {
    /// `storageAccountName` and `storageAccountKey` (the public cloud's endpoint).
    ///
    /// # Errors
    /// The key is not base64.
    pub fn with_key(name: &str, key: &str) -> Result<Self, CheckpointError> {
        Ok(Self {
            name: name.to_string(),
            key: decode_key(key)?,
            endpoint: format!("https://{name}.blob.core.windows.net"),
        })
    }

    /// A storage connection string.
    ///
    /// # Errors
    /// A part is missing or malformed.
    pub fn from_connection_string(cs: &str) -> Result<Self, CheckpointError> {
        let mut parts = BTreeMap::new();
        for part in cs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                CheckpointError::Settings(
                    "the storage connection string has a part that is not key=value".into(),
                )
            })?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        if parts
            .get("usedevelopmentstorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Ok(Self {
                name: DEV_ACCOUNT.into(),
                key: decode_key(DEV_KEY)?,
                endpoint: format!("http://127.0.0.1:10000/{DEV_ACCOUNT}"),
            });
        }
        let missing = |k: &str| {
            CheckpointError::Settings(format!("the storage connection string has no {k}"))
        };
        let name = parts
            .get("accountname")
            .ok_or_else(|| missing("AccountName"))?;
        let key = parts
            .get("accountkey")
            .ok_or_else(|| missing("AccountKey"))?;
        let endpoint = match parts.get("blobendpoint") {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => {
                let protocol = parts
                    .get("defaultendpointsprotocol")
                    .map_or("https", String::as_str);
                let suffix = parts
                    .get("endpointsuffix")
                    .map_or("core.windows.net", String::as_str);
                format!("{protocol}://{name}.blob.{suffix}")
            }
        };
        Ok(Self {
            name: name.clone(),
            key: decode_key(key)?,
            endpoint,
        })
    }
}

fn decode_key(key: &str) -> Result<Vec<u8>, CheckpointError> {
    base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|_| CheckpointError::Settings("the storage account key is not base64".into()))
}

/// Where a consumer group stands in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The partition.
    pub partition: String,
    /// The offset of the last event handled (`offset`).
    pub offset: Option<String>,
    /// Its sequence number (`sequencenumber`).
    pub sequence_number: Option<i64>,
}

/// Who holds a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The partition.
    pub partition: String,
    /// The owner's id (`ownerid`; empty: given up).
    pub owner: String,
    /// The blob's ETag: a claim must name it.
    pub etag: String,
    /// When it was last claimed or renewed (milliseconds since the epoch).
    pub last_modified_ms: i64,
}

/// One blob in a listing.
struct Listed {
    name: String,
    etag: String,
    last_modified_ms: i64,
    metadata: BTreeMap<String, String>,
}

/// The checkpoints and ownership of one consumer group of one event hub.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    http: reqwest::Client,
    account: StorageAccount,
    container: String,
    /// `<namespace>/<event hub>/<consumer group>`, lowercase.
    prefix: String,
}

impl CheckpointStore {
    /// The store for `consumer_group` of `event_hub` in `namespace` (its host name), in
    /// `container`.
    ///
    /// # Errors
    /// The HTTP client cannot be made.
    pub fn new(
        account: StorageAccount,
        container: &str,
        namespace: &str,
        event_hub: &str,
        consumer_group: &str,
    ) -> Result<Self, CheckpointError> {
        let http = crate::oauth::http_client(None).map_err(CheckpointError::Settings)?;
        Ok(Self {
            http,
            account,
            container: container.to_string(),
            prefix: format!("{namespace}/{event_hub}/{consumer_group}").to_ascii_lowercase(),
        })
    }

    /// Creates the container unless it exists.
    ///
    /// # Errors
    /// Blob Storage refused or could not be reached.
    pub async fn ensure_container(&self) -> Result<(), CheckpointError> {
        let what = format!("creating container {}", self.container);
        let (status, body, _) = self
            .send(
                reqwest::Method::PUT,
                &self.container,
                &[("restype", "container")],
                &[],
                &what,
            )
            .await?;
        match status {
            201 | 409 => Ok(()),
            _ => Err(status_error(&what, status, &body)),
        }
    }

    /// Every partition's checkpoint.
    ///
    /// # Errors
    /// Blob Storage refused or could not be reached.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, CheckpointError> {
        Ok(self
            .list("checkpoint")
            .await?
            .into_iter()
            .map(|b| Checkpoint {
                partition: partition_of(&b.name),
                offset: b.metadata.get("offset").cloned(),
                sequence_number: b
                    .metadata
                    .get("sequencenumber")
                    .and_then(|s| s.parse().ok()),
            })
            .collect())
    }

    /// Records `checkpoint`.
    ///
    /// # Errors
    /// Blob Storage refused or could not be reached.
    pub async fn set_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let mut metadata = Vec::new();
        if let Some(o) = &checkpoint.offset {
            metadata.push(("offset", o.clone()));
        }
        if let Some(s) = checkpoint.sequence_number {
            metadata.push(("sequencenumber", s.to_string()));
        }
        let name = format!("checkpoint/{}", checkpoint.partition);
        self.put(&name, &metadata, None).await.map(|_| ())
    }

    /// Every partition's ownership.
    ///
    /// # Errors
    /// Blob Storage refused or could not be reached.
    pub async fn ownership(&self) -> Result<Vec<Ownership>, CheckpointError> {
        Ok(self
            .list("ownership")
            .await?
            .into_iter()
            .map(|b| Ownership {
                partition: partition_of(&b.name),
                owner: b.metadata.get("ownerid").cloned().unwrap_or_default(),
                etag: b.etag,
                last_modified_ms: b.last_modified_ms,
            })
            .collect())
    }

    /// Claims `partition` for `owner`: `etag` is that of the ownership last seen (`None`: no one
    /// has held it). The new ownership, or `None` when someone else claimed it since.
    ///
    /// # Errors
    /// Blob Storage refused otherwise or could not be reached.
    pub async fn claim(
        &self,
        partition: &str,
        owner: &str,
        etag: Option<&str>,
    ) -> Result<Option<Ownership>, CheckpointError> {
        let name = format!("ownership/{partition}");
        let condition = match etag {
            Some(e) => ("If-Match", e.to_string()),
            None => ("If-None-Match", "*".to_string()),
        };
        let put = self
            .put(&name, &[("ownerid", owner.to_string())], Some(condition))
            .await?;
        Ok(put.map(|(etag, last_modified_ms)| Ownership {
            partition: partition.to_string(),
            owner: owner.to_string(),
            etag,
            last_modified_ms,
        }))
    }

    /// Uploads the empty blob `<prefix>/<name>` with `metadata`, under `condition`; its ETag
    /// and time, or `None` when the condition failed (412, or 409 for a blob that exists).
    async fn put(
        &self,
        name: &str,
        metadata: &[(&str, String)],
        condition: Option<(&str, String)>,
    ) -> Result<Option<(String, i64)>, CheckpointError> {
        let blob = format!("{}/{}/{name}", self.container, self.prefix);
        let what = format!("writing blob {blob}");
        let mut headers: Vec<(String, String)> =
            vec![("x-ms-blob-type".into(), "BlockBlob".into())];
        for (k, v) in metadata {
            headers.push((format!("x-ms-meta-{k}"), v.clone()));
        }
        if let Some((k, v)) = condition {
            headers.push((k.to_string(), v));
        }
        let (status, body, answer) = self
            .send(reqwest::Method::PUT, &blob, &[], &headers, &what)
            .await?;
        match status {
            201 => Ok(Some((
                answer.etag.unwrap_or_default(),
                answer.last_modified_ms.unwrap_or_default(),
            ))),
            409 | 412 => Ok(None),
            _ => Err(status_error(&what, status, &body)),
        }
    }

    /// The blobs under `<prefix>/<kind>/`, every page.
    async fn list(&self, kind: &str) -> Result<Vec<Listed>, CheckpointError> {
        let prefix = format!("{}/{kind}/", self.prefix);
        let what = format!("listing {prefix} in container {}", self.container);
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let mut query = vec![
                ("restype", "container"),
                ("comp", "list"),
                ("prefix", prefix.as_str()),
                ("include", "metadata"),
            ];
            if !marker.is_empty() {
                query.push(("marker", marker.as_str()));
            }
            let (status, body, _) = self
                .send(reqwest::Method::GET, &self.container, &query, &[], &what)
                .await?;
            if status != 200 {
                return Err(status_error(&what, status, &body));
            }
            out.extend(parse_listing(&body));
            marker = element(&body, "NextMarker").unwrap_or_default();
            if marker.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Sends a signed request for `path` (under the account's endpoint); (status, body, the
    /// answer's ETag and Last-Modified).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        what: &str,
    ) -> Result<(u16, String, Answer), CheckpointError> {
        let url = format!("{}/{}", self.account.endpoint, encode_path(path));
        let method_is_put = method == reqwest::Method::PUT;
        let date = daprd_core::gocompat::format_http_date_ms(now_ms());
        let mut all: Vec<(String, String)> = headers.to_vec();
        all.push(("x-ms-date".into(), date));
        all.push(("x-ms-version".into(), API_VERSION.into()));
        let authorization = self.sign(method.as_str(), &url, query, &all)?;
        let mut request = self
            .http
            .request(method, &url)
            .query(query)
            .header("Authorization", authorization)
            .timeout(Duration::from_secs(30));
        for (k, v) in &all {
            request = request.header(k.as_str(), v.as_str());
        }
        if method_is_put {
            // Put Blob needs the length said, even of nothing (reqwest leaves it out)
            request = request.header("Content-Length", "0");
        }
        let fail = |e: reqwest::Error| CheckpointError::Http {
            what: what.to_string(),
            message: e.to_string(),
        };
        let response = request.body(Vec::new()).send().await.map_err(fail)?;
        let status = response.status().as_u16();
        let answer = Answer {
            etag: response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            last_modified_ms: response
                .headers()
                .get("last-modified")
                .and_then(|v| v.to_str().ok())
                .and_then(daprd_core::gocompat::parse_http_date_ms),
        };
        let code = response
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = response.text().await.map_err(fail)?;
        if let (Some(code), true) = (code, body.is_empty()) {
            body = code;
        }
        Ok((status, body, answer))
    }

    /// Shared Key authorization: the HMAC-SHA256, with the account key, of the request's
    /// canonical form.
    fn sign(
        &self,
        method: &str,
        url: &str,
        query: &[(&str, &str)],
        headers: &[(String, String)],
    ) -> Result<String, CheckpointError> {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map_or("", |(_, v)| v.as_str())
        };
        let mut canonical_headers: Vec<(String, &str)> = headers
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-ms-"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
            .collect();
        canonical_headers.sort();
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or("", |(_, p)| p);
        let mut resource = format!("/{}/{path}", self.account.name);
        let mut params: Vec<(String, &str)> = query
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), *v))
            .collect();
        params.sort();
        for (k, v) in params {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        let mut to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n{}\n{}\n\n\n",
            get("If-Match"),
            get("If-None-Match")
        );
        for (k, v) in canonical_headers {
            to_sign.push_str(&format!("{k}:{v}\n"));
        }
        to_sign.push_str(&resource);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.account.key);
        let signature = ring::hmac::sign(&key, to_sign.as_bytes());
        Ok(format!(
            "SharedKey {}:{}",
            self.account.name,
            base64::engine::general_purpose::STANDARD.encode(signature.as_ref())
        ))
    }
}

/// The parts of an answer the store reads.
struct Answer {
    etag: Option<String>,
    last_modified_ms: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn status_error(what: &str, status: u16, body: &str) -> CheckpointError {
    CheckpointError::Status {
        what: what.to_string(),
        status,
        body: body.chars().take(300).collect(),
    }
}

/// The partition a blob is for: its name's last segment.
fn partition_of(name: &str) -> String {
    name.rsplit('/').next().unwrap_or_default().to_string()
}

/// A blob path with each segment percent-encoded (`/` kept).
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|s| daprd_core::gocompat::query_escape(s).replace('+', "%20"))
        .collect::<Vec<_>>()
        .join("/")
}

/// The text of the first `<name>` element of `xml`, entities decoded.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(unescape(&xml[start..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The blobs of a List Blobs answer.
fn parse_listing(xml: &str) -> Vec<Listed> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Blob>") {
        let Some(end) = rest[start..].find("</Blob>") else {
            break;
        };
        let blob = &rest[start..start + end];
        rest = &rest[start + end + "</Blob>".len()..];
        let Some(name) = element(blob, "Name") else {
            continue;
        };
        let mut metadata = BTreeMap::new();
        if let Some(md) = blob
            .find("<Metadata>")
            .and_then(|s| blob[s..].find("</Metadata>").map(|e| &blob[s + 10..s + e]))
        {
            let mut m = md;
            while let Some(open) = m.find('<') {
                let Some(close) = m[open..].find('>') else {
                    break;
                };
                let tag = &m[open + 1..open + close];
                if tag.starts_with('/') || tag.ends_with('/') {
                    m = &m[open + close + 1..];
                    continue;
                }
                let body_start = open + close + 1;
                let end_tag = format!("</{tag}>");
                let Some(body_end) = m[body_start..].find(&end_tag) else {
                    break;
                };
                metadata.insert(
                    tag.to_ascii_lowercase(),
                    unescape(&m[body_start..body_start + body_end]),
                );
                m = &m[body_start + body_end + end_tag.len()..];
            }
        }
        out.push(Listed {
            name,
            // quoted, as the ETag header has it
            etag: element(blob, "Etag")
                .map(|e| format!("\"{}\"", e.trim_matches('"')))
                .unwrap_or_default(),
            last_modified_ms: element(blob, "Last-Modified")
                .and_then(|d| daprd_core::gocompat::parse_http_date_ms(&d))
                .unwrap_or_default(),
            metadata,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_the_endpoint() {
        let a = StorageAccount::from_connection_string("UseDevelopmentStorage=true").unwrap();
        assert_eq!(a.endpoint, "http://127.0.0.1:10000/devstoreaccount1");
        let a = StorageAccount::from_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn",
        )
        .unwrap();
        assert_eq!(a.endpoint, "https://acct.blob.core.chinacloudapi.cn");
        assert!(
            !format!("{a:?}").contains("a2V5"),
            "the key stays out of logs"
        );
        let e = StorageAccount::from_connection_string("AccountName=acct").unwrap_err();
        assert!(e.to_string().contains("AccountKey"), "{e}");
    }

    #[test]
    fn a_listing_yields_names_etags_and_metadata() {
        let xml = "<?xml version=\"1.0\"?><EnumerationResults><Blobs><Blob><Name>ns/hub/cg/checkpoint/3</Name><Properties><Last-Modified>Tue, 10 Nov 2009 23:00:00 GMT</Last-Modified><Etag>0x8D</Etag></Properties><Metadata><offset>42</offset><sequencenumber>7</sequencenumber></Metadata></Blob><Blob><Name>ns/hub/cg/checkpoint/4</Name><Properties><Etag>0x9</Etag></Properties><Metadata /></Blob></Blobs><NextMarker /></EnumerationResults>";
        let blobs = parse_listing(xml);
        assert_eq!(blobs.len(), 2);
        assert_eq!(partition_of(&blobs[0].name), "3");
        assert_eq!(blobs[0].etag, "\"0x8D\"");
        assert_eq!(blobs[0].metadata["offset"], "42");
        assert_eq!(blobs[0].metadata["sequencenumber"], "7");
        assert!(blobs[0].last_modified_ms > 0);
        assert!(blobs[1].metadata.is_empty());
    }
}
