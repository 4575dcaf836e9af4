# Usage: bash scripts/deterministic_run.sh <empty folder>   (the .venv active; ~3 minutes on 2 cores; RUNS="spear" picks runs)
# A deterministic 3-step run of the spear and gigpo-spear presets on the tiny model (issue 12: same metrics before
# and after), and spear-replay: spear admitting and replaying every row (admission threshold -1, filters off), so
# the replay draw, its commit and the buffer update run at every step; spear-sft: spear after a 2-step SFT warm-up.
set -e
out=$1
for run in ${RUNS:-spear gigpo-spear spear-replay spear-sft}; do
  preset=spear
  extra=()
  if [ "$run" = gigpo-spear ]; then preset=gigpo-spear; fi
  if [ "$run" = spear-replay ]; then extra=(replay.admission_threshold=-1.0 algorithm.filter_incomplete_responses=false
    algorithm.filter_overlong_responses=false algorithm.filter_repetitive_responses=false
    algorithm.filter_unreadable_responses=false replay.recalibration_keep=nonnegative); fi
  if [ "$run" = spear-sft ]; then extra=(trainer.sft_warmup_steps=2 trainer.sft_episodes=4 trainer.sft_rows_per_step=4); fi
  SPEAR_ROLLOUT_AUTO=hf python -m spear_engine.cli train --preset $preset --env twx --no-progress model.path=tiny \
    "env.kwargs={game: twc, game_params: 'numLocations=1,numItemsToPutAway=1'}" env.max_steps=3 data.train_batch_size=2 env.rollout.n=2 \
    data.max_response_length=12 trainer.total_training_steps=3 trainer.deterministic=true rollout.name=hf \
    trainer.test_freq=3 trainer.val_episodes=4 trainer.logger=[jsonl] trainer.output_dir=$out trainer.run_name=$run \
    rollout.rollout_filter_ratio=1.0 trainer.save_freq=0 "${extra[@]}" > $out/$run.log 2>&1
done
