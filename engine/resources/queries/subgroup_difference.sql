-- name: subgroup_difference
-- answers: Do two subgroups of a metadata column explain classes differently? For every
--   (target, roi): the mean importance in group_a and in group_b and their difference, largest
--   absolute difference first. Metadata values are compared as text (e.g. age 50 is '50').
-- params: column (string), group_a (string), group_b (string), run_id (string, default latest run), sign (string, default abs), stat (string, default mass)
WITH grouped AS (
    SELECT patient_id, json_extract_string(metadata, '$.' || $column) AS grp
    FROM patients
    WHERE run_id = $run_id
),
vals AS (
    SELECT i.method, i.target, i.roi, g.grp, i.value
    FROM importances AS i
    JOIN grouped AS g ON g.patient_id = i.patient_id
    WHERE i.run_id = $run_id AND i.sign = $sign AND i.stat = $stat AND g.grp IN ($group_a, $group_b)
)
SELECT
    method,
    target,
    roi,
    avg(value) FILTER (WHERE grp = $group_a) AS mean_a,
    avg(value) FILTER (WHERE grp = $group_b) AS mean_b,
    avg(value) FILTER (WHERE grp = $group_a) - avg(value) FILTER (WHERE grp = $group_b) AS difference,
    count(value) FILTER (WHERE grp = $group_a) AS n_a,
    count(value) FILTER (WHERE grp = $group_b) AS n_b
FROM vals
GROUP BY method, target, roi
ORDER BY abs(difference) DESC NULLS LAST, method, target, roi
