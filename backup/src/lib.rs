//! The standby role: replica maintenance, failure detector, fencing, takeover, resume. Not built yet.
