-- name: global_matrix
-- answers: The cohort-level explanation matrix: mean importance of every target class inside
--   every RoI (long format, one row per target x roi), the weights of the global graph.
-- params: run_id (string, default latest run), sign (string, default abs), stat (string, default mass)
SELECT
    method,
    target,
    roi,
    avg(value) AS mean_value,
    count(value) AS patients
FROM importances
WHERE run_id = $run_id AND sign = $sign AND stat = $stat
GROUP BY method, target, roi
ORDER BY method, target, mean_value DESC, roi
