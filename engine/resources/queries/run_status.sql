-- name: run_status
-- answers: Where does a run stand? Patients per status (pending, running, done, failed) with
--   their attempts, the run's own status, and for failures the patient ids with their errors.
-- params: run_id (string, default latest run)
SELECT
    r.run_id,
    r.status AS run_status,
    p.status,
    count(*) AS patients,
    CAST(sum(p.attempts) AS BIGINT) AS attempts,
    string_agg(
        CASE WHEN p.status = 'failed' THEN p.patient_id || ': ' || coalesce(p.error, '(no message)') END,
        ' | ' ORDER BY p.patient_id
    ) AS failures
FROM patients AS p
JOIN runs AS r ON r.run_id = p.run_id
WHERE p.run_id = $run_id
GROUP BY r.run_id, r.status, p.status
ORDER BY p.status
