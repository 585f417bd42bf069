//! The standby role: replica maintenance, the failure detector, fencing, takeover
//! and resume. See ARCHITECTURE.md "Takeover (backup)".

pub mod detector;
pub mod node;
pub mod prompt;
pub mod replica;
pub mod resume;
pub mod staging;
pub mod takeover;
