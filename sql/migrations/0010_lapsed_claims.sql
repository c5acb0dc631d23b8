-- tasker-worker 0010: a claim that lapses is recorded.
--
-- A worker paused or cut off past its visibility timeout loses its claim: the message becomes
-- visible and another claim takes it. Until now that left no trace but a second StepAssigned.
-- The worker's claim now writes who claimed, at which read_ct and when into the message's
-- headers (key tasker_claim); a put-back (tasker.retry_steps: a retry, a release, a rejection)
-- removes it, a settle deletes the message. So when a claim finds tasker_claim with the read_ct
-- the message still has, that earlier claim neither settled nor put back: its vt lapsed. The
-- claiming worker records StepAssignmentTimedOut (reason vt_lapsed, the previous holder).
-- Put-backs keep their fence and their header patch; they only drop the key.

CREATE OR REPLACE FUNCTION tasker.retry_steps(
    p_queue         text,
    p_msg_ids       bigint[],
    p_read_cts      integer[],
    p_delays_ms     integer[],
    p_headers       jsonb[],
    p_count_attempt boolean DEFAULT true
)
RETURNS TABLE (msg_id bigint, applied boolean)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::integer[], $3::integer[], $4::jsonb[])
                AS i(msg_id, read_ct, delay_ms, patch)
        ), moved AS (
            UPDATE pgmq.%1$I AS q
               SET vt = clock_timestamp() + make_interval(secs => i.delay_ms / 1000.0),
                   read_ct = CASE WHEN $5 THEN q.read_ct ELSE greatest(q.read_ct - 1, 0) END,
                   headers = CASE WHEN i.patch IS NULL THEN q.headers - 'tasker_claim'
                                  ELSE (coalesce(q.headers, '{}'::jsonb) - 'tasker_claim') || i.patch END
              FROM input AS i
             WHERE q.msg_id = i.msg_id AND q.read_ct = i.read_ct
            RETURNING q.msg_id
        )
        SELECT i.msg_id, (m.msg_id IS NOT NULL)
          FROM input AS i LEFT JOIN moved AS m ON m.msg_id = i.msg_id
        $sql$, pgmq.format_table_name(p_queue, 'q'))
    USING p_msg_ids, p_read_cts, p_delays_ms, p_headers, p_count_attempt;
END;
$$;
