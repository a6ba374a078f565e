-- name: self_importance
-- answers: How much of each class's explanation lies inside the class itself? Per class, the
--   distribution over the cohort of the mass of c inside c: count, min, quartiles, max, mean.
-- params: run_id (string, default latest run), sign (string, default abs)
SELECT
    method,
    target AS class,
    count(value) AS patients,
    min(value) AS min,
    quantile_cont(value, 0.25) AS q25,
    quantile_cont(value, 0.5) AS median,
    quantile_cont(value, 0.75) AS q75,
    max(value) AS max,
    avg(value) AS mean
FROM importances
WHERE run_id = $run_id AND stat = 'mass' AND sign = $sign AND target = roi
GROUP BY method, target
ORDER BY method, median DESC, class
