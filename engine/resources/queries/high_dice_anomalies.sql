-- name: high_dice_anomalies
-- answers: Which patients are segmented well (mean foreground Dice >= min_dice) yet have
--   extreme explanations (mean anomaly score in the top of the run: percent rank >=
--   min_percentile)? These are the cases Dice alone would not flag.
-- params: run_id (string, default latest run), min_dice (float, default 0.95), min_percentile (float, default 0.9), k (integer, default 10)
WITH model AS (
    SELECT model_id FROM anomaly_models
    WHERE run_id = $run_id
    ORDER BY created_at DESC
    LIMIT 1
),
scored AS (
    SELECT s.patient_id, s.score, s.decision,
           percent_rank() OVER (ORDER BY s.score) AS score_percentile
    FROM anomaly_scores AS s
    JOIN model USING (model_id)
    WHERE s.target = '__mean__'
),
dice AS (
    SELECT patient_id, mean_dice FROM patient_dice WHERE run_id = $run_id
)
SELECT
    sc.patient_id,
    d.mean_dice,
    sc.score,
    sc.score_percentile,
    sc.decision,
    CAST(p.metadata AS VARCHAR) AS metadata
FROM scored AS sc
JOIN dice AS d ON d.patient_id = sc.patient_id
LEFT JOIN patients AS p ON p.run_id = $run_id AND p.patient_id = sc.patient_id
WHERE d.mean_dice >= $min_dice AND sc.score_percentile >= $min_percentile
ORDER BY sc.score DESC, sc.patient_id
LIMIT $k
