-- tasker-worker 0010: a claim that lapses is recorded.
--
-- A worker paused or cut off past its visibility timeout loses its claim: the message becomes
-- visible and another claim takes it. Until now that left no trace but a second StepAssigned.
-- The worker's claim now writes who claimed into the message's headers (key tasker_claim, one
-- constant object per worker: {"worker_id": ...}, merged in without building JSON per row); a
-- put-back (tasker.retry_steps: a retry, a release, a rejection) and a requeue from the DLQ
-- remove it, a settle deletes the message. So a claim that finds tasker_claim knows the previous
-- claim neither settled nor was put back: its vt lapsed. The claiming worker records
-- StepAssignmentTimedOut (reason vt_lapsed, the previous holder and its claim time).
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

-- A requeued dead letter starts afresh: no claim of its former life is taken for a lapse.
CREATE OR REPLACE FUNCTION tasker.requeue_dead_letters(p_queue text, p_msg_ids bigint[] DEFAULT NULL)
RETURNS TABLE (dlq_msg_id bigint, new_msg_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_dlq  text := p_queue || '_dlq';
    v_row  record;
    v_new  bigint;
BEGIN
    IF tasker.queue_table(p_queue) IS NULL OR tasker.queue_table(v_dlq) IS NULL THEN
        RAISE EXCEPTION 'queue % or its dead-letter queue does not exist', p_queue
            USING ERRCODE = '42P01';
    END IF;
    FOR v_row IN EXECUTE format(
        'DELETE FROM pgmq.%1$I WHERE $1 IS NULL OR msg_id = ANY($1) '
        'RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers',
        pgmq.format_table_name(v_dlq, 'q')) USING p_msg_ids
    LOOP
        EXECUTE format(
            'INSERT INTO pgmq.%1$I (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers) '
            'VALUES ($1, $2, $3, $4, $5, $6, $7)', pgmq.format_table_name(v_dlq, 'a'))
            USING v_row.msg_id, v_row.vt, v_row.read_ct, v_row.enqueued_at, v_row.last_read_at,
                  v_row.message, v_row.headers;
        IF jsonb_typeof(v_row.message) = 'object' THEN
            DELETE FROM tasker.step_results
             WHERE step_uuid = tasker.try_uuid(v_row.message ->> 'step_uuid')
               AND status IN ('failed', 'dead_lettered');
        END IF;
        SELECT s.id INTO v_new
          FROM pgmq.send(p_queue, v_row.message,
                         (coalesce(v_row.headers, '{}'::jsonb) - 'tasker_dlq' - 'tasker_last_error' - 'tasker_rejections' - 'tasker_claim')
                         || jsonb_build_object('tasker_requeued_from', v_row.msg_id)) AS s(id);
        dlq_msg_id := v_row.msg_id;
        new_msg_id := v_new;
        RETURN NEXT;
    END LOOP;
END;
$$;

