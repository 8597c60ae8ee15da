"""The console alert consumer: pure parsing/formatting (``consumer.render``) and the Kafka tail
(``consumer.app``)."""
