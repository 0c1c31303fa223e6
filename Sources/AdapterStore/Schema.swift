/// The schema and its migrations, versioned with `PRAGMA user_version`.
///
/// One row per tensor under its upload lets aggregation read one tensor name across all clients at
/// a time. An upload keeps its original header bytes, so the file a client sent is rebuilt exactly:
/// its tensors tile the data section, so the data is the tensors' bytes in offset order.
enum Schema {
    static let migrations: [String] = [
        """
        CREATE TABLE rounds (
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            sealed INTEGER NOT NULL DEFAULT 0,
            revision INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (federation, round)
        ) WITHOUT ROWID;
        CREATE TABLE uploads (
            id INTEGER PRIMARY KEY,
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            client TEXT NOT NULL,
            rank INTEGER NOT NULL,
            weight REAL NOT NULL,
            bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            uploaded_at TEXT NOT NULL,
            header BLOB NOT NULL,
            UNIQUE (federation, round, client),
            FOREIGN KEY (federation, round) REFERENCES rounds (federation, round)
        );
        CREATE TABLE tensors (
            upload_id INTEGER NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            data_offset INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (upload_id, name)
        );
        """,
        // Client tokens, stored only as SHA-256 hashes.
        """
        CREATE TABLE client_tokens (
            token_hash TEXT PRIMARY KEY,
            federation TEXT NOT NULL,
            client TEXT NOT NULL,
            created_at TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX client_tokens_by_client ON client_tokens (federation, client);
        """,
        // The digest and size of every aggregate computed, by the round's revision: once on record,
        // a cache miss can send its ETag first and stream the body while computing it, and a
        // conditional GET is answered without computing. A change to the round deletes its rows.
        """
        CREATE TABLE aggregate_digests (
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            strategy TEXT NOT NULL,
            rank INTEGER NOT NULL,
            dtype TEXT NOT NULL,
            engine_version INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            crc32 INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            PRIMARY KEY (federation, round, revision, strategy, rank, dtype, engine_version)
        ) WITHOUT ROWID;
        """,
        // PEFT scales: an upload's lora_alpha (NULL: its rank, scale 1) and use_rslora, and its
        // adapter_config.json as sent (NULL for uploads tagged by query parameters). Aggregate digests
        // gain the scale they were unfolded to as part of their key; the old records are dropped.
        """
        ALTER TABLE uploads ADD COLUMN lora_alpha REAL;
        ALTER TABLE uploads ADD COLUMN use_rslora INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE uploads ADD COLUMN config BLOB;
        DROP TABLE aggregate_digests;
        CREATE TABLE aggregate_digests (
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            strategy TEXT NOT NULL,
            rank INTEGER NOT NULL,
            dtype TEXT NOT NULL,
            scaling TEXT NOT NULL,
            engine_version INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            crc32 INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            PRIMARY KEY (federation, round, revision, strategy, rank, dtype, scaling, engine_version)
        ) WITHOUT ROWID;
        """,
        // A round's global rank (the largest rank any module has in it, rank_pattern included),
        // kept with each change of its uploads. Rounds from before take their largest r.
        """
        ALTER TABLE rounds ADD COLUMN max_rank INTEGER NOT NULL DEFAULT 0;
        UPDATE rounds SET max_rank = coalesce(
            (SELECT max(u.rank) FROM uploads u WHERE u.federation = rounds.federation AND u.round = rounds.round), 0);
        """,
        // Round bases: the global adapter a round started from, at scale 1, stored like an upload
        // (its header, one row per tensor) and read as one more source row per tensor.
        """
        CREATE TABLE bases (
            id INTEGER PRIMARY KEY,
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            source TEXT NOT NULL,
            created_at TEXT NOT NULL,
            header BLOB NOT NULL,
            UNIQUE (federation, round),
            FOREIGN KEY (federation, round) REFERENCES rounds (federation, round)
        );
        CREATE TABLE base_tensors (
            base_id INTEGER NOT NULL REFERENCES bases (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            data_offset INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (base_id, name)
        );
        """,
        // Federations that run themselves: settings, why each round was sealed, and deadlines as
        // rows (unix seconds), so that they survive restarts and any process on the file fires them.
        """
        CREATE TABLE federations (
            federation TEXT PRIMARY KEY,
            settings TEXT NOT NULL,
            updated_at TEXT NOT NULL
        ) WITHOUT ROWID;
        ALTER TABLE rounds ADD COLUMN sealed_by TEXT;
        ALTER TABLE rounds ADD COLUMN deadline_missed INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE rounds ADD COLUMN first_upload_at REAL;
        ALTER TABLE rounds ADD COLUMN quorum_at REAL;
        UPDATE rounds SET sealed_by = 'request' WHERE sealed;
        CREATE TABLE deadlines (
            federation TEXT NOT NULL,
            round INTEGER NOT NULL,
            reason TEXT NOT NULL,
            due_at REAL NOT NULL,
            PRIMARY KEY (federation, round, reason)
        ) WITHOUT ROWID;
        CREATE INDEX deadlines_by_time ON deadlines (due_at);
        """,
    ]

    /// Brings the schema up to date. The version is read inside the write transaction, so two
    /// processes starting on one new file apply each migration once.
    static func migrate(_ connection: any StoreConnection) throws {
        try connection.transaction(.write) {
            let version = try connection.statement("PRAGMA user_version")
            _ = try version.step()
            let current = Int(version.integer(0))
            version.reset()
            for (index, migration) in migrations.enumerated().dropFirst(current) {
                try connection.execute(migration)
                try connection.execute("PRAGMA user_version = \(index + 1)")
            }
            // Migration 5 added rounds.max_rank with each round's largest r; rank_pattern can say more.
            if (1..<5).contains(current) { try AdapterStore.recomputeGlobalRanks(connection) }
        }
    }
}

/// PostgreSQL's schema: the tables SQLite's migrations arrive at, in PostgreSQL's types, versioned
/// in `schema_version`; a later change to SQLite's schema adds a migration here too. Ids are in the
/// "C" collation (byte order, as SQLite's BINARY) so both databases feed the engine clients in the
/// same order, and the same bytes come out. Tensor rows have a `rowid` as SQLite's do, so the
/// store's queries are shared. Tensor bytes are stored uncompressed (`STORAGE EXTERNAL`): floats
/// do not compress, and trying would cost every upload.
enum PostgresSchema {
    static let migrations: [String] = [
        """
        CREATE TABLE rounds (
            federation TEXT COLLATE "C" NOT NULL,
            round BIGINT NOT NULL,
            sealed BIGINT NOT NULL DEFAULT 0,
            revision BIGINT NOT NULL DEFAULT 0,
            max_rank BIGINT NOT NULL DEFAULT 0,
            sealed_by TEXT,
            deadline_missed BIGINT NOT NULL DEFAULT 0,
            first_upload_at DOUBLE PRECISION,
            quorum_at DOUBLE PRECISION,
            PRIMARY KEY (federation, round)
        );
        CREATE TABLE uploads (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            federation TEXT COLLATE "C" NOT NULL,
            round BIGINT NOT NULL,
            client TEXT COLLATE "C" NOT NULL,
            rank BIGINT NOT NULL,
            weight DOUBLE PRECISION NOT NULL,
            bytes BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            uploaded_at TEXT NOT NULL,
            header BYTEA NOT NULL,
            lora_alpha DOUBLE PRECISION,
            use_rslora BIGINT NOT NULL DEFAULT 0,
            config BYTEA,
            UNIQUE (federation, round, client),
            FOREIGN KEY (federation, round) REFERENCES rounds (federation, round)
        );
        CREATE TABLE tensors (
            rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            upload_id BIGINT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
            name TEXT COLLATE "C" NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            data_offset BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (upload_id, name)
        );
        ALTER TABLE tensors ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE TABLE client_tokens (
            token_hash TEXT PRIMARY KEY,
            federation TEXT COLLATE "C" NOT NULL,
            client TEXT COLLATE "C" NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX client_tokens_by_client ON client_tokens (federation, client);
        CREATE TABLE aggregate_digests (
            federation TEXT COLLATE "C" NOT NULL,
            round BIGINT NOT NULL,
            revision BIGINT NOT NULL,
            strategy TEXT NOT NULL,
            rank BIGINT NOT NULL,
            dtype TEXT NOT NULL,
            scaling TEXT NOT NULL,
            engine_version BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            crc32 BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (federation, round, revision, strategy, rank, dtype, scaling, engine_version)
        );
        CREATE TABLE bases (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            federation TEXT COLLATE "C" NOT NULL,
            round BIGINT NOT NULL,
            rank BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            source TEXT NOT NULL,
            created_at TEXT NOT NULL,
            header BYTEA NOT NULL,
            UNIQUE (federation, round),
            FOREIGN KEY (federation, round) REFERENCES rounds (federation, round)
        );
        CREATE TABLE base_tensors (
            rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            base_id BIGINT NOT NULL REFERENCES bases (id) ON DELETE CASCADE,
            name TEXT COLLATE "C" NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            data_offset BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (base_id, name)
        );
        ALTER TABLE base_tensors ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE TABLE federations (
            federation TEXT COLLATE "C" PRIMARY KEY,
            settings TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE deadlines (
            federation TEXT COLLATE "C" NOT NULL,
            round BIGINT NOT NULL,
            reason TEXT NOT NULL,
            due_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (federation, round, reason)
        );
        CREATE INDEX deadlines_by_time ON deadlines (due_at);
        """
    ]

    /// Brings the schema up to date inside a write transaction (its lock serialises processes
    /// starting together on a new database, so each migration is applied once).
    static func migrate(_ connection: any StoreConnection) throws {
        try connection.transaction(.write) {
            // Looked up first: a role that may only read and write tables cannot even ask to create one.
            let exists = try connection.statement("SELECT to_regclass('schema_version') IS NOT NULL")
            _ = try exists.step()
            if exists.integer(0) == 0 { try connection.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)") }
            exists.reset()
            let version = try connection.statement("SELECT coalesce(max(version), 0) FROM schema_version")
            _ = try version.step()
            let current = Int(version.integer(0))
            version.reset()
            guard current <= migrations.count else {
                throw StoreError(.database, "the database's schema is newer than this server", detail: "schema version \(current)")
            }
            for (index, migration) in migrations.enumerated().dropFirst(current) {
                try connection.execute(migration)
                try connection.execute("DELETE FROM schema_version; INSERT INTO schema_version VALUES (\(index + 1))")
            }
        }
    }
}
