"""Learning while serving: the replay buffer, TBPTT fine-tuning, the validation gate,
checkpoints and offline pretraining. No Kafka in here."""
