-- name: top_anomalies
-- answers: Which patients of a run have the most anomalous explanations? The k highest anomaly
--   scores (latest anomaly model of the run), with the patient's mean foreground Dice, manifest
--   metadata and the top reasons (the features furthest from the fit cohort - RoI masses or what
--   the model predicted - as robust z-scores). outlier: the forest's decision < 0 (forest scorers only).
-- params: run_id (string, default latest run), k (integer, default 10)
WITH model AS (
    SELECT model_id FROM anomaly_models
    WHERE run_id = $run_id
    ORDER BY created_at DESC
    LIMIT 1
),
reasons AS (
    SELECT r.patient_id,
           string_agg(CASE coalesce(r.kind, 'mass_abs')
                          WHEN 'pred_voxels' THEN r.target || ' predicted volume'
                          WHEN 'pred_confidence' THEN r.target || ' prediction confidence'
                          WHEN 'pred_entropy' THEN r.target || ' prediction entropy'
                          WHEN 'input_mean' THEN r.target || ' input intensity'
                          WHEN 'input_std' THEN r.target || ' input intensity spread'
                          WHEN 'mass_abs' THEN r.target || ' in ' || r.roi
                          ELSE r.target || ' in ' || r.roi || ' [' || r.kind || ']' END
                      || ' (z ' || printf('%+.1f', r.z) || ')', ', ' ORDER BY r."rank") AS reasons
    FROM anomaly_reasons AS r JOIN model USING (model_id)
    GROUP BY r.patient_id
),
dice AS (
    SELECT patient_id, mean_dice FROM patient_dice WHERE run_id = $run_id
)
SELECT
    row_number() OVER (ORDER BY s.score DESC, s.patient_id) AS rank,
    s.patient_id,
    s.score,
    s.decision,
    s.decision < 0 AS outlier,
    d.mean_dice,
    CAST(p.metadata AS VARCHAR) AS metadata,
    s.model_id,
    re.reasons
FROM anomaly_scores AS s
JOIN model USING (model_id)
LEFT JOIN dice AS d ON d.patient_id = s.patient_id
LEFT JOIN reasons AS re ON re.patient_id = s.patient_id
LEFT JOIN patients AS p ON p.run_id = $run_id AND p.patient_id = s.patient_id
WHERE s.target = '__mean__'
ORDER BY s.score DESC, s.patient_id
LIMIT $k
