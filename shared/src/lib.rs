//! Replication protocol, config, replica table, VIP and ARP helpers (see ARCHITECTURE.md). Not built yet: nothing here works so far.
