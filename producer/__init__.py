"""The Faker transaction producer: a seeded generator with labelled fraud episodes
(``producer.generator``, pure) and the Kafka side (``producer.app``)."""
