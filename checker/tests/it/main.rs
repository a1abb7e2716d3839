//! The checkers, fed valid histories (which must pass) and histories with one injected bug
//! each (which must be flagged, with the right kind).

mod generated;
mod linearizability;
mod replay;
mod support;
mod watch;
