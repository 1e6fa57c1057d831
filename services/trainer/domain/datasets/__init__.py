"""Server-held datasets: encrypted storage, Poisson sampling and TrainOnDataset."""
