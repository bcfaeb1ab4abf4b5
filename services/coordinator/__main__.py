from services.coordinator.recovery import main

main()
