-- docs/design.md#sharded-planreplay: the exact sums each pod of a sharded PlanReplay's Indexed Job writes; the
-- operator adds a run's shards up, bootstraps and writes the status, then deletes them. Keyed by the resource's
-- uid and generation, so a new generation or a recreated resource never meets an older run's sums.
CREATE TABLE replay_shards (
    replay_uid  text        NOT NULL,
    generation  bigint      NOT NULL,
    shard       integer     NOT NULL,
    shards      integer     NOT NULL,
    requests    bigint      NOT NULL,
    sums        bytea       NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replay_uid, generation, shard)
);
