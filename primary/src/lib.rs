//! The serving role: proxy, inbound gate, logged IO, replication sender. Not built yet.
