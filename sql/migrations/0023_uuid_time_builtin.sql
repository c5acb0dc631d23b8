-- tasker-worker 0023: tasker.uuid_time reads the UUIDv7's time with PostgreSQL's own functions
-- (issue 32, the step path's cost).
--
-- tasker.uuid_time (0021) runs three times per step: in the claim's dedup probe (its partition
-- pruning), in the settle's INSERT (the row's uuid_time) and in the day partition's CHECK. Its
-- expression, written for any server, went through hex text: encode(), 'x' || ..., ::bit(48),
-- ::bigint, a numeric division and to_timestamp(float8), about 1 us each time on this machine,
-- so 3 us of a step's 40 us of server CPU. On PostgreSQL 17 and later, uuid_extract_version()
-- and uuid_extract_timestamp() read the same bits in C: tasker.recorded_step_uuids over a day
-- partition of 1,000,000 rows, 1,000 calls of 128 step_uuids (half recorded), went from 3.3-3.7
-- to 1.9 us per step_uuid (docs/performance.md, "What today's features cost the step path").
--
-- Same result for every uuid but some far ahead: from about the year 4100 on, the old
-- expression's float8 seconds are a few microseconds off for some times (5000-01-01
-- 00:50:00.009 read as .009008), where the new one is exact. A row stamped that way can only be
-- in the default partition (no day partition reaches that far), so those rows are stamped again
-- here, and every day partition's CHECK holds as before. Older servers keep 0021's expression.

DO $migration$
BEGIN
    IF current_setting('server_version_num')::integer >= 170000 THEN
        -- Inlined where it is used (a single expression, IMMUTABLE like the functions it calls).
        EXECUTE $f$
CREATE OR REPLACE FUNCTION tasker.uuid_time(p_uuid uuid)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT CASE WHEN uuid_extract_version(p_uuid) = 7
                 AND uuid_extract_timestamp(p_uuid) >= timestamptz '1970-01-02 00:00:00+00'
                THEN uuid_extract_timestamp(p_uuid)
                ELSE timestamptz 'epoch' END
$body$
        $f$;
        UPDATE tasker.step_results_default AS d
           SET uuid_time = tasker.uuid_time(d.step_uuid)
         WHERE d.uuid_time <> tasker.uuid_time(d.step_uuid);
    END IF;
END;
$migration$;
