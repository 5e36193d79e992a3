//! Log setup (text or one JSON object per line) and the request id that every line logged while
//! serving one RPC carries, on whichever thread it runs.

use std::cell::Cell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

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
        let ts = timestamp(SystemTime::now());
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

/// RFC 3339 UTC with milliseconds, without a date crate.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's public-domain algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_795_564_799)),
            "2026-11-24T23:59:59.000Z"
        );
    }

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
