//! (being written)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir { ToServer, ToClient }
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError { #[error("x")] X }
pub struct Tracker;
