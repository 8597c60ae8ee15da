from spark_job.cli import main

main()
