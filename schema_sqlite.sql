-- nightcrier schema for SQLite.
--
-- Each "-- version: N" line starts migration N. nightcrier applies, in one
-- transaction, every migration newer than the highest version recorded in
-- schema_migrations, and refuses a database recorded as newer than itself.
-- Table and column names are the same as in schema_postgres.sql.
-- Timestamps are UTC ISO-8601 text of fixed width, so they sort as strings.

-- version: 1

CREATE TABLE fault_events (
    event_id             TEXT PRIMARY KEY,
    fault_id             TEXT NOT NULL DEFAULT '',
    subscription_id      TEXT NOT NULL DEFAULT '',
    cluster              TEXT NOT NULL CONSTRAINT chk_fault_events_cluster CHECK (cluster <> ''),
    upstream_cluster     TEXT NOT NULL DEFAULT '',
    received_at          TEXT NOT NULL,
    resource_api_version TEXT,
    resource_kind        TEXT,
    resource_name        TEXT,
    resource_namespace   TEXT,
    resource_uid         TEXT,
    fault_type           TEXT NOT NULL CONSTRAINT chk_fault_events_fault_type CHECK (fault_type <> ''),
    severity             TEXT NOT NULL DEFAULT '',
    context              TEXT NOT NULL DEFAULT '',
    timestamp            TEXT NOT NULL DEFAULT '',
    mcp_payload          TEXT NOT NULL
);
CREATE INDEX idx_fault_events_fault_id ON fault_events (fault_id);

CREATE TABLE incidents (
    incident_id          TEXT PRIMARY KEY,
    event_id             TEXT NOT NULL REFERENCES fault_events (event_id),
    fault_id             TEXT NOT NULL DEFAULT '',
    status               TEXT NOT NULL CONSTRAINT chk_incidents_status
                         CHECK (status IN ('pending', 'investigating', 'resolved', 'failed',
                                           'agent_failed', 'skipped')),
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL,
    started_at           TEXT,
    completed_at         TEXT,
    exit_code            INTEGER,
    failure_reason       TEXT,
    cluster              TEXT NOT NULL CONSTRAINT chk_incidents_cluster CHECK (cluster <> ''),
    subscription_id      TEXT NOT NULL DEFAULT '',
    resource_api_version TEXT,
    resource_kind        TEXT,
    resource_name        TEXT,
    resource_namespace   TEXT,
    resource_uid         TEXT,
    fault_type           TEXT NOT NULL CONSTRAINT chk_incidents_fault_type CHECK (fault_type <> ''),
    severity             TEXT NOT NULL DEFAULT '',
    context              TEXT NOT NULL DEFAULT '',
    timestamp            TEXT NOT NULL DEFAULT '',
    attempts             INTEGER NOT NULL DEFAULT 0 CONSTRAINT chk_incidents_attempts CHECK (attempts >= 0),
    claimed_by           TEXT,
    heartbeat_at         TEXT,
    workspace_path       TEXT
);
-- The rule "never two agents on one cluster", held by the database itself so
-- that it also holds across processes.
CREATE UNIQUE INDEX uq_incidents_investigating_cluster ON incidents (cluster)
    WHERE status = 'investigating';
CREATE INDEX idx_incidents_claim ON incidents (status, created_at);
CREATE INDEX idx_incidents_cluster ON incidents (cluster, status, created_at);
CREATE INDEX idx_incidents_fault_id ON incidents (fault_id);
CREATE INDEX idx_incidents_namespace ON incidents (resource_namespace);
CREATE INDEX idx_incidents_fault_type ON incidents (fault_type);
CREATE INDEX idx_incidents_severity ON incidents (severity);
CREATE INDEX idx_incidents_created_at ON incidents (created_at);

CREATE TABLE agent_executions (
    execution_id         TEXT PRIMARY KEY,
    incident_id          TEXT NOT NULL REFERENCES incidents (incident_id),
    agent_image          TEXT NOT NULL DEFAULT '',
    started_at           TEXT NOT NULL,
    completed_at         TEXT,
    exit_code            INTEGER,
    error_message        TEXT,
    log_paths            TEXT,
    tokens_used          INTEGER
);
CREATE INDEX idx_agent_executions_incident_id ON agent_executions (incident_id);
CREATE INDEX idx_agent_executions_started_at ON agent_executions (started_at);

CREATE TABLE triage_reports (
    report_id            TEXT PRIMARY KEY,
    incident_id          TEXT NOT NULL REFERENCES incidents (incident_id),
    execution_id         TEXT NOT NULL REFERENCES agent_executions (execution_id),
    generated_at         TEXT NOT NULL,
    report_markdown      TEXT NOT NULL,
    report_html          TEXT,
    summary_text         TEXT,
    raw_report_path      TEXT,
    storage_type         TEXT NOT NULL DEFAULT 'database',
    structured_data      TEXT
);
CREATE INDEX idx_triage_reports_incident_id ON triage_reports (incident_id);
CREATE INDEX idx_triage_reports_generated_at ON triage_reports (generated_at);

CREATE TABLE rejected_events (
    rejected_id          TEXT PRIMARY KEY,
    cluster              TEXT NOT NULL,
    received_at          TEXT NOT NULL,
    reason               TEXT NOT NULL,
    raw_body             TEXT NOT NULL
);
CREATE INDEX idx_rejected_events_received_at ON rejected_events (received_at);

-- Windows in which a cluster was not watched: from losing a subscription to
-- having a new one.
CREATE TABLE subscription_gaps (
    gap_id               TEXT PRIMARY KEY,
    cluster              TEXT NOT NULL,
    started_at           TEXT NOT NULL,
    ended_at             TEXT,
    reason               TEXT NOT NULL
);
CREATE INDEX idx_subscription_gaps_cluster ON subscription_gaps (cluster, started_at);

-- version: 2

-- One row per cluster, kept in step with incidents inside the same transactions:
-- whether an incident of the cluster is investigating, and when its oldest
-- pending incident was received. A claim reads the oldest ready row here
-- instead of scanning a backlog that may sit behind busy clusters.
CREATE TABLE cluster_queue (
    cluster              TEXT PRIMARY KEY,
    busy                 BOOLEAN NOT NULL DEFAULT FALSE,
    next_pending_at      TEXT
);
CREATE INDEX idx_cluster_queue_ready ON cluster_queue (next_pending_at)
    WHERE NOT busy AND next_pending_at IS NOT NULL;
CREATE INDEX idx_cluster_queue_busy ON cluster_queue (cluster) WHERE busy;
INSERT INTO cluster_queue (cluster, busy, next_pending_at)
    SELECT cluster,
           MAX(CASE WHEN status = 'investigating' THEN 1 ELSE 0 END) = 1,
           MIN(CASE WHEN status = 'pending' THEN created_at END)
    FROM incidents GROUP BY cluster;

-- version: 3

-- Values nightcrier makes up once and every replica shares, such as the key
-- that signs report links when none is configured.
CREATE TABLE settings (
    name                 TEXT PRIMARY KEY,
    value                TEXT NOT NULL
);

-- version: 4

-- The same fault emission can reach nightcrier more than once: through two
-- subscriptions while one replaces another, or through two replicas while a
-- cluster changes hands. The server stamps each detection with its faultId and
-- a time of second precision, and never sends one faultId again on a
-- subscription within minutes; two subscriptions stamp the same detection
-- within a second of each other. So a fault whose faultId matches a stored one
-- and whose timestamp lies at most one second from it is a copy. The keys are
-- "<faultId>/<2-second window>", the windows starting at even and at odd
-- seconds: two times at most one second apart share one of the two windows,
-- two times two or more seconds apart share neither. NULL (no faultId or no
-- readable timestamp) is never a copy. Rows stored before this version have
-- no keys.
ALTER TABLE fault_events ADD COLUMN emission_key_even TEXT;
ALTER TABLE fault_events ADD COLUMN emission_key_odd TEXT;
CREATE UNIQUE INDEX uq_fault_events_emission_even ON fault_events (cluster, emission_key_even);
CREATE UNIQUE INDEX uq_fault_events_emission_odd ON fault_events (cluster, emission_key_odd);

-- version: 5

-- Which incidents get no agent, and why. skip_reason begins with its cause's
-- word (duplicate, severity, stale, backlog, budget, disabled). A repeat of a
-- fault condition points at the incident that is triaged for it
-- (duplicate_of), and that incident counts its repeats. Each run's spend is
-- what its CLI reported.
ALTER TABLE incidents ADD COLUMN duplicate_of TEXT;
ALTER TABLE incidents ADD COLUMN skip_reason TEXT;
ALTER TABLE incidents ADD COLUMN recurrences INTEGER NOT NULL DEFAULT 0;
ALTER TABLE incidents ADD COLUMN last_recurred_at TEXT;
ALTER TABLE agent_executions ADD COLUMN cost_usd REAL;
UPDATE incidents SET skip_reason = 'disabled: triage is off for the cluster' WHERE status = 'skipped';
-- The repeat check at intake looks up the incidents that may be repeated.
CREATE INDEX idx_incidents_repeatable ON incidents (fault_id, cluster)
    WHERE duplicate_of IS NULL AND skip_reason IS NULL AND fault_id <> '';
