//! The sidecar's log: plain text, or with `--log-as-json` one JSON object per line in Go
//! daprd's shape (`time`, `level`, `type: log`, `scope`, `msg`, `instance`, `app_id`, `ver`,
//! then the event's own fields).

use std::fmt;

use daprd_runtime::config::{LogLevel, RUNTIME_VERSION};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber: `level` unless `DAPRD_LOG` gives a filter.
pub fn init(level: LogLevel, json: bool, app_id: &str) {
    let filter = level.filter();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAPRD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{filter},h2=warn,hyper=warn,tower=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .event_format(DaprJson {
                app_id: app_id.to_string(),
                instance: hostname(),
            })
            .init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// The host name, as Go daprd's `instance` field.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// Dapr's logger scope for an event's target: Dapr's own scopes (`dapr.runtime.http-info`)
/// as they are, everything else `dapr.runtime`.
fn scope(target: &str) -> &str {
    if target.starts_with("dapr.") {
        target
    } else {
        "dapr.runtime"
    }
}

struct DaprJson {
    app_id: String,
    instance: String,
}

#[derive(Default)]
struct Fields {
    message: String,
    others: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.others
                .insert(field.name().to_string(), Value::String(value.to_string()));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.others
            .insert(field.name().to_string(), Value::Bool(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.others.insert(field.name().to_string(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.others.insert(field.name().to_string(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.others.insert(field.name().to_string(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.others
                .insert(field.name().to_string(), Value::String(text));
        }
    }
}

impl<S, N> FormatEvent<S, N> for DaprJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "time".into(),
            humantime::format_rfc3339_nanos(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        // logrus's names, as Go daprd writes them
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            _ => "debug",
        };
        line.insert("level".into(), level.into());
        line.insert("type".into(), "log".into());
        line.insert("scope".into(), scope(meta.target()).into());
        line.insert("msg".into(), fields.message.into());
        line.insert("instance".into(), self.instance.clone().into());
        line.insert("app_id".into(), self.app_id.clone().into());
        line.insert("ver".into(), RUNTIME_VERSION.into());
        for (k, v) in fields.others {
            line.entry(k).or_insert(v);
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
