//! The driver's one error type, and the one place where errors become CSI status codes.

use std::fmt;
use std::path::PathBuf;

use grpcio::{RpcStatus, RpcStatusCode};
use nix::errno::Errno;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A required request field is empty. `path` is the request's path, when the call names one.
    MissingField {
        field: &'static str,
        volume: String,
        path: PathBuf,
    },
    /// A volume id that is not of the form `nlc-<uuid>`: no volume of this driver has it. `path`
    /// is the request's path, when the call names one.
    BadVolumeId { id: String, path: PathBuf },
    /// A path that may not be used as given (relative, `..`, a symlink, …).
    BadPath {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    /// A parameter or option this driver does not offer (`path` as for `MissingField`).
    Unsupported {
        volume: String,
        path: PathBuf,
        what: String,
    },
    /// A publish asking for a capability the volume does not offer: the spec's "exceeds
    /// capabilities".
    ExceedsCapabilities {
        volume: String,
        path: PathBuf,
        what: String,
    },
    /// The capacity range cannot be satisfied.
    BadCapacity { volume: String, reason: String },
    /// The request conflicts with what already exists.
    Conflict {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    /// A mount at the target that is not a bind of this volume; never unmounted by us.
    ForeignMount {
        volume: String,
        path: PathBuf,
        what: String,
    },
    /// Nothing known by that volume id or path.
    NotFound {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    /// The same volume and target are being worked on by another call.
    InFlight { volume: String, path: PathBuf },
    /// The node is not set up to serve the request (missing or unusable base dir, …).
    NodeNotReady {
        volume: String,
        path: PathBuf,
        reason: String,
    },
    /// A system call failed.
    Sys {
        op: &'static str,
        volume: String,
        path: PathBuf,
        errno: Errno,
    },
    /// A dependency (the worker pool, the Kubernetes API) cannot take the request now.
    Unavailable { volume: String, reason: String },
    /// The plugin is shutting down.
    ShuttingDown,
}

impl Error {
    pub fn sys(op: &'static str, volume: &str, path: impl Into<PathBuf>, errno: Errno) -> Error {
        Error::Sys {
            op,
            volume: volume.to_owned(),
            path: path.into(),
            errno,
        }
    }

    pub fn bad_path(volume: &str, path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::BadPath {
            volume: volume.to_owned(),
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn conflict(volume: &str, path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Conflict {
            volume: volume.to_owned(),
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(volume: &str, path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::NotFound {
            volume: volume.to_owned(),
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(volume: &str, what: impl Into<String>) -> Error {
        Error::Unsupported {
            volume: volume.to_owned(),
            path: PathBuf::new(),
            what: what.into(),
        }
    }

    pub fn missing(field: &'static str, volume: &str) -> Error {
        Error::MissingField {
            field,
            volume: volume.to_owned(),
            path: PathBuf::new(),
        }
    }

    /// The same refusal, naming the request's path (checks of ids, fields and options do not
    /// know it).
    pub fn at_path(mut self, at: &std::path::Path) -> Error {
        if let Error::MissingField { path, .. } | Error::Unsupported { path, .. } | Error::BadVolumeId { path, .. } =
            &mut self
        {
            if path.as_os_str().is_empty() {
                *path = at.to_owned();
            }
        }
        self
    }

    /// A capability refused at publish: what the volume does not offer (FAILED_PRECONDITION),
    /// where CreateVolume and the like refuse it as an argument.
    pub fn exceeding_capabilities(self) -> Error {
        match self {
            Error::Unsupported { volume, path, what } => Error::ExceedsCapabilities { volume, path, what },
            e => e,
        }
    }

    /// The CSI status code for this error. Every mapping lives here.
    pub fn code(&self) -> RpcStatusCode {
        match self {
            Error::MissingField { .. } | Error::BadPath { .. } | Error::Unsupported { .. } => {
                RpcStatusCode::INVALID_ARGUMENT
            }
            Error::BadCapacity { .. } => RpcStatusCode::OUT_OF_RANGE,
            Error::Conflict { .. } => RpcStatusCode::ALREADY_EXISTS,
            // The spec's "volume does not exist": an id no volume of ours can have is one.
            Error::NotFound { .. } | Error::BadVolumeId { .. } => RpcStatusCode::NOT_FOUND,
            Error::InFlight { .. } => RpcStatusCode::ABORTED,
            Error::NodeNotReady { .. } | Error::ForeignMount { .. } | Error::ExceedsCapabilities { .. } => {
                RpcStatusCode::FAILED_PRECONDITION
            }
            Error::Unavailable { .. } | Error::ShuttingDown => RpcStatusCode::UNAVAILABLE,
            Error::Sys { errno, .. } => match errno {
                Errno::ENOSPC | Errno::EDQUOT | Errno::ENFILE | Errno::EMFILE | Errno::ENOMEM => {
                    RpcStatusCode::RESOURCE_EXHAUSTED
                }
                // A symlink where a directory must be: the caller handed us a path we refuse.
                Errno::ELOOP | Errno::ENOTDIR => RpcStatusCode::INVALID_ARGUMENT,
                Errno::EROFS | Errno::EACCES | Errno::EPERM => RpcStatusCode::FAILED_PRECONDITION,
                Errno::EBUSY => RpcStatusCode::FAILED_PRECONDITION,
                // Try again: the mount table kept changing while it was read (kernels before
                // 5.8), or every stats walk slot was taken.
                Errno::EAGAIN => RpcStatusCode::UNAVAILABLE,
                _ => RpcStatusCode::INTERNAL,
            },
        }
    }

    pub fn to_status(&self) -> RpcStatus {
        RpcStatus::with_message(self.code(), self.to_string())
    }
}

/// " path P:" or nothing, for errors that may come without a path (controller calls).
fn at(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" path {}:", path.display())
    }
}

fn vol(volume: &str) -> &str {
    if volume.is_empty() {
        "<none>"
    } else {
        volume
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::MissingField { field, volume, path } => {
                write!(
                    f,
                    "volume {}:{} required field {field} is missing",
                    vol(volume),
                    at(path)
                )
            }
            Error::BadVolumeId { id, path } => write!(
                f,
                "volume {id:?}:{} no such volume: not a node-local-cache volume id (want nlc-<uuid>)",
                at(path)
            ),
            Error::BadPath { volume, path, reason } => {
                write!(f, "volume {}: path {}: {reason}", vol(volume), path.display())
            }
            Error::Unsupported { volume, path, what } => {
                write!(f, "volume {}:{} unsupported {what}", vol(volume), at(path))
            }
            Error::ExceedsCapabilities { volume, path, what } => {
                write!(
                    f,
                    "volume {}:{} the volume does not offer {what}",
                    vol(volume),
                    at(path)
                )
            }
            Error::BadCapacity { volume, reason } => write!(f, "volume {}: {reason}", vol(volume)),
            Error::Conflict { volume, path, reason } | Error::NotFound { volume, path, reason } => {
                write!(f, "volume {}:{} {reason}", vol(volume), at(path))
            }
            Error::ForeignMount { volume, path, what } => write!(
                f,
                "volume {}: path {}: is a mount of {what}, not of this volume; refusing to unmount it",
                vol(volume),
                path.display()
            ),
            Error::InFlight { volume, path } => write!(
                f,
                "volume {}: path {}: another operation on this volume and path is in progress",
                vol(volume),
                path.display()
            ),
            Error::NodeNotReady { volume, path, reason } => {
                write!(
                    f,
                    "volume {}: path {}: node not ready: {reason}",
                    vol(volume),
                    path.display()
                )
            }
            Error::Sys {
                op,
                volume,
                path,
                errno,
            } => {
                write!(
                    f,
                    "volume {}: path {}: {op} failed: {}",
                    vol(volume),
                    path.display(),
                    errno.desc()
                )
            }
            Error::Unavailable { volume, reason } => write!(f, "volume {}: {reason}", vol(volume)),
            Error::ShuttingDown => write!(f, "the plugin is shutting down; retry"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_resource_exhausted() {
        let e = Error::sys("mkdir", "nlc-x", "/base/nlc-x", Errno::ENOSPC);
        assert_eq!(e.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
        assert_eq!(
            e.to_string(),
            "volume nlc-x: path /base/nlc-x: mkdir failed: No space left on device"
        );
    }

    #[test]
    fn every_message_names_volume_and_path() {
        let e = Error::bad_path("nlc-a", "rel/target", "must be absolute");
        let s = e.to_status();
        assert_eq!(s.code(), RpcStatusCode::INVALID_ARGUMENT);
        assert!(s.message().contains("nlc-a") && s.message().contains("rel/target"));
        assert!(Error::missing("volume_id", "").to_string().contains("<none>"));
    }

    #[test]
    fn symlink_refusals_are_invalid_argument() {
        for errno in [Errno::ELOOP, Errno::ENOTDIR] {
            assert_eq!(
                Error::sys("open", "v", "/t", errno).code(),
                RpcStatusCode::INVALID_ARGUMENT
            );
        }
        assert_eq!(
            Error::sys("mount", "v", "/t", Errno::EIO).code(),
            RpcStatusCode::INTERNAL
        );
    }
}
