# Usage: bash scripts/deterministic_run.sh <empty folder>   (needs the .venv active; ~1 minute on 2 cores)
# A deterministic 3-step run of the spear and gigpo-spear presets on the tiny model (issue 12: same metrics before and after)
set -e
out=$1
for preset in spear gigpo-spear; do
  SPEAR_ROLLOUT_AUTO=hf python -m spear_engine.cli train --preset $preset --env twx --no-progress model.path=tiny \
    "env.kwargs={game: twc, game_params: 'numLocations=1,numItemsToPutAway=1'}" env.max_steps=3 data.train_batch_size=2 env.rollout.n=2 \
    data.max_response_length=12 trainer.total_training_steps=3 trainer.deterministic=true rollout.name=hf \
    trainer.test_freq=3 trainer.val_episodes=4 trainer.logger=[jsonl] trainer.output_dir=$out trainer.run_name=$preset \
    rollout.rollout_filter_ratio=1.0 trainer.save_freq=0 > $out/$preset.log 2>&1
done
