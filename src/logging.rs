//! Log setup (text or one JSON object per line) and the request id that every line logged while
//! serving one RPC carries, on whichever thread it runs.

use std::cell::Cell;
use std::io::Write;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

thread_local! {
    static REQUEST_ID: Cell<u64> = const { Cell::new(0) };
}

/// Marks the current thread as working for request `id` until dropped.
pub struct RequestScope {
    previous: u64,
}

impl RequestScope {
    pub fn enter(id: u64) -> RequestScope {
        RequestScope {
            previous: REQUEST_ID.with(|c| c.replace(id)),
        }
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        REQUEST_ID.with(|c| c.set(self.previous));
    }
}

pub fn current_request() -> u64 {
    REQUEST_ID.with(Cell::get)
}

/// `filter` uses env_logger's syntax (`info`, `node_local_cache=debug,grpcio=warn`). An explicit
/// filter wins over `RUST_LOG`; with neither, `info`.
pub fn init(format: LogFormat, filter: Option<&str>) {
    let mut builder = env_logger::Builder::new();
    let env = std::env::var("RUST_LOG").ok();
    builder.parse_filters(filter.or(env.as_deref()).unwrap_or("info"));
    builder.format(move |buf, record| {
        let ts = crate::time::format(SystemTime::now());
        let req = current_request();
        match format {
            LogFormat::Text => {
                let req = if req == 0 { String::new() } else { format!(" req={req}") };
                writeln!(
                    buf,
                    "{ts} {:<5} {}{req}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                )
            }
            LogFormat::Json => {
                let mut line = serde_json::json!({
                    "ts": ts,
                    "level": record.level().as_str(),
                    "target": record.target(),
                    "msg": record.args().to_string(),
                });
                if req != 0 {
                    line["req"] = req.into();
                }
                writeln!(buf, "{line}")
            }
        }
    });
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_scope_nests() {
        assert_eq!(current_request(), 0);
        {
            let _a = RequestScope::enter(5);
            {
                let _b = RequestScope::enter(6);
                assert_eq!(current_request(), 6);
            }
            assert_eq!(current_request(), 5);
        }
        assert_eq!(current_request(), 0);
    }
}
